// Declarations of the per-ISA pointwise epilogues (pointwise_epilogue.h), defined in
// isa_avx512.cpp, isa_avx2.cpp and isa_base.cpp and picked at runtime (isa.h).
#pragma once

#include <cstdint>

#include "isa.h"

#define EFFNET_PW_EPILOGUE_DECL(ISA)                                                       \
  namespace effnet::cpu_pw::ISA {                                                          \
  void bias_act_rows(float* y, int64_t rows, int64_t C, const float* bias, int64_t act);   \
  void bias_sigmoid_rows(float* y, int64_t rows, int64_t C, const float* bias);            \
  }

#ifdef EFFNET_CPU_X86
EFFNET_PW_EPILOGUE_DECL(avx512)
EFFNET_PW_EPILOGUE_DECL(avx2)
#endif
EFFNET_PW_EPILOGUE_DECL(base)
