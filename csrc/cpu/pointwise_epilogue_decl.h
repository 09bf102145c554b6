// Declarations of the per-ISA pointwise epilogues (pointwise_epilogue.h) and training BN
// tile kernels (pointwise_bn_tiles.h), defined in
// isa_avx512.cpp, isa_avx2.cpp and isa_base.cpp and picked at runtime (isa.h).
#pragma once

#include <cstdint>

#include "isa.h"

#define EFFNET_PW_EPILOGUE_DECL(ISA)                                                       \
  namespace effnet::cpu_pw::ISA {                                                          \
  void bias_act_rows(float* y, int64_t rows, int64_t C, const float* bias, int64_t act);   \
  void bias_act_planar(float* y, int64_t C, int64_t cols, int64_t ld, const float* bias,  \
                       int64_t act);                                                       \
  void bias_sigmoid_rows(float* y, int64_t rows, int64_t C, const float* bias);            \
  void tile_moments(const float* y, int64_t rows, int64_t C, float* mean, float* m2,       \
                    float* dev);                                                           \
  void tile_affine_act(float* y, int64_t rows, int64_t C, const float* scale,              \
                       const float* shift, int64_t act);                                   \
  void tile_affine_act_stream(const float* src, float* dst, int64_t rows, int64_t C,       \
                              const float* scale, const float* shift, int64_t act);        \
  void tile_bn_reduce(const float* dout, const float* y, int64_t rows, int64_t C,          \
                      const float* scale, const float* shift, const float* mean,           \
                      int64_t act, float* sum_g, float* sum_g_yc);                         \
  void tile_bn_grad(const float* dout, const float* y, float* dy, int64_t rows, int64_t C, \
                    const float* scale, const float* shift, const float* mean,             \
                    const float* coef_b, const float* coef_c, int64_t act);                \
  void tile_bn_reduce_scale(const float* dout, float* y, int64_t rows, int64_t C,          \
                            const float* scale, const float* shift, const float* mean,     \
                            int64_t act, float* sum_g, float* sum_g_yc);                   \
  }

#ifdef EFFNET_CPU_X86
EFFNET_PW_EPILOGUE_DECL(avx512)
EFFNET_PW_EPILOGUE_DECL(avx2)
#endif
EFFNET_PW_EPILOGUE_DECL(base)
