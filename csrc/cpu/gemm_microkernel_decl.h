// Declarations of the per-ISA native GEMM (gemm_microkernel.h), defined in isa_avx512.cpp,
// isa_avx2.cpp and isa_base.cpp and picked at runtime (isa.h).
#pragma once

#include <cstdint>

#include "isa.h"

namespace effnet::cpu_gemm {
// Whether AVX-512 panels take a half vector for their last 8 or fewer columns
// (gemm_microkernel.h; on by default): a switch for in-process A/B measurements, the
// results are the same bits either way. set_half_vectors returns the previous setting.
bool half_vectors();
bool set_half_vectors(bool enabled);
}  // namespace effnet::cpu_gemm

#define EFFNET_GEMM_DECL(ISA)                                                              \
  namespace effnet::cpu_gemm::ISA {                                                        \
  void gemm_packed(const float* x, int64_t ldx, const float* wt, int64_t ldw, float* y,   \
                   int64_t ldy, int64_t rows, int64_t cin, int64_t col0, int64_t col1);    \
  void gemm_packed_taps(const float* a, int64_t a_row, const int64_t* off, int64_t taps,   \
                        const float* wt, int64_t ldw, float* y, int64_t ldy, int64_t rows,  \
                        int64_t col0, int64_t col1);                                        \
  int64_t packed_panel();                                                                  \
  int64_t packed_unit();                                                                   \
  void pack_wt(const float* w, int64_t cout, int64_t cin, float* wt, int64_t ldw);         \
  void gemm_dtx_native(const float* dy, int64_t ld_dy, const float* x, float* dw,         \
                       int64_t rows, int64_t cin, int64_t cout, bool accumulate);          \
  }

#ifdef EFFNET_CPU_X86
EFFNET_GEMM_DECL(avx512)
EFFNET_GEMM_DECL(avx2)
#endif
EFFNET_GEMM_DECL(base)
