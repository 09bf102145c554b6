// Shared declarations of the CPU depthwise conv + BN + activation passes.
//
// The row kernels (depthwise_kernels.h with depthwise_row_access.h and
// depthwise_row_kernels.h) are compiled once per instruction set, each in its
// own translation unit (isa_avx512.cpp, isa_avx2.cpp, isa_base.cpp) and namespace;
// depthwise_bn_act.cpp picks one set at runtime. This header holds what both sides need:
// the call geometry, the per-channel parameters, the accumulation type, Chan's merge and
// the signatures of the four passes (declared per ISA, instantiated in the ISA files for
// float, BFloat16 and Half, and for double in the baseline ISA only: float64 is there for
// gradcheck and float64 references, not speed, and its instantiations were a third of each
// ISA file's compile time). Layout: channels_last (NHWC) rows, see the kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "isa.h"
#ifdef EFFNET_CPU_X86
#include <immintrin.h>
#endif

#include "common/math.h"
#include "packed_gemm.h"

namespace effnet::cpu_dw {

// Geometry of one call; x is (N, C, H, W), y is (N, C, OH, OW), kernel K x K. pf is the
// software prefetch distance of the row kernels in pixels (0: none; see prefetch_read).
struct Geo {
  int64_t N, C, H, W, OH, OW, K, S, pt, pl, act;
  int64_t pf = 0;
};

// Per-channel inputs in the accumulation type; wt is the weight as [kh][kw][c].
template <typename A>
struct Params {
  const A* wt = nullptr;
  const A* scale = nullptr;
  const A* shift = nullptr;
  const A* mean = nullptr;
  const A* coef_b = nullptr;
  const A* coef_c = nullptr;
};

// Accumulation type of storage type X: double for double, float otherwise.
template <typename X>
using AccOf = std::conditional_t<std::is_same_v<X, double>, double, float>;

// Chan's parallel merge of (nb, mean_b, m2_b) into acc = [count, mean[C], m2[C]]. With
// dev_b, the part's mean is mean_b + dev_b / nb (a rounded mean and the sum of deviations
// from it, see moments_row), taken in double: a part mean rounded to A enters M2 through
// the cross term 2 nb (mean_b - mean) * rounding (relative error ~3e-5 in float32 on
// channels whose mean is ~1e4 times their spread).
template <typename A>
inline void chan_merge(double* acc, int64_t C, double nb, const A* mean_b, const A* m2_b,
                       const A* dev_b = nullptr) {
  if (nb == 0) return;
  const double na = acc[0], n = na + nb;
  double* mean = acc + 1;
  double* m2 = acc + 1 + C;
  for (int64_t c = 0; c < C; ++c) {
    const double part_mean = dev_b == nullptr ? double(mean_b[c])
                                              : double(mean_b[c]) + double(dev_b[c]) / nb;
    const double delta = part_mean - mean[c];
    mean[c] += delta * (nb / n);
    m2[c] += double(m2_b[c]) + delta * delta * (na * nb / n);
  }
  acc[0] = n;
}

// Groups [first, last) of `count` groups of `units` work units: group i covers units
// [begin(i), end(i)) and writes its own partial sums, which the caller merges in group
// order (deterministic for any thread count). A pass call takes a range of groups, so
// one thread's scratch (row caches) serves all of its groups.
struct GroupRange {
  int64_t units, count, first, last;
  int64_t begin(int64_t i) const { return units * i / count; }
  int64_t end(int64_t i) const { return units * (i + 1) / count; }
};

// The four passes over work units (output rows, or image x input-row blocks for backward):
//   stats_rows      per-row mean/M2 of y, Chan-merged into group i's partial
//                   part + i * (1 + 2C) = [count, mean[C], m2[C]] (and y kept in y_out,
//                   when given: float storage)
//   forward_rows    out = act(y * scale + shift) (+ per-row sums of out, when asked)
//   forward_rows_planar  forward_rows with x and out NCHW (depthwise_planar.h)
//   affine_act_rows forward_rows on a kept y, in place, no conv
//   reduce_rows     part + i * 2C += [sum g, sum g * (y - mean)] (and g, y kept in
//                   g_out, y_out, when given: float storage)
//   backward_units  dx rows and dweight sums (part + i * K * K * C, [kh][kw][c]) of
//                   the input-row blocks of group i (y from y_kept instead of the conv,
//                   when given: float storage)
// HEAD is `template <typename X>` for the declarations, `template` for an instantiation.
#define EFFNET_DW_PASSES(HEAD, X)                                                              \
  HEAD void stats_rows(const Geo& g, const X* x, const Params<AccOf<X>>& p,                    \
                       const GroupRange& groups, double* part, X* y_out);                      \
  HEAD void forward_rows(const Geo& g, const X* x, const Params<AccOf<X>>& p, X* out,          \
                         int64_t r0, int64_t r1, AccOf<X>* row_sums);                          \
  HEAD void forward_rows_planar(const Geo& g, const X* x, const Params<AccOf<X>>& p, X* out,   \
                                int64_t r0, int64_t r1, AccOf<X>* row_sums);                   \
  HEAD void affine_act_rows(const Geo& g, X* y, const Params<AccOf<X>>& p, int64_t r0,         \
                            int64_t r1, AccOf<X>* row_sums);                                   \
  HEAD void reduce_rows(const Geo& g, const X* x, const X* dy, const Params<AccOf<X>>& p,      \
                        const GroupRange& groups, double* part, X* g_out, X* y_out);           \
  HEAD void backward_units(const Geo& g, const X* x, const X* dy, const X* y_kept,             \
                           const Params<AccOf<X>>& p, X* dx, int64_t blocks,                   \
                           const GroupRange& groups, double* part);

// The eval expand conv feeding a depthwise conv (BN folded): the depthwise input row ih
// of image n is act(x[n, ih] w^T + bias), computed per row by expand_forward_rows instead
// of being read from memory. x is (N, H, W, cin) channels_last, product runs x w^T for
// w (C, cin) (packed_gemm.h), bias (C), act an act code; float32 only. bias_act is pw_conv_act's epilogue
// (cpu_pw::bias_act_rows of the same ISA), so the rows are those pw_conv_act writes.
struct ExpandSource {
  const float* x;
  const ::effnet::cpu::XWtProduct* product;  // x row block -> its expanded rows before bias + act
  const float* bias;
  int64_t cin, act;
  void (*bias_act)(float* y, int64_t rows, int64_t C, const float* bias, int64_t act);
};

// Declarations per ISA namespace (avx512, avx2, base); an ISA file instantiates them with
// EFFNET_DW_INSTANTIATE_PASSES() after including depthwise_kernels.h in that namespace.
//   expand_forward_rows  forward_rows (float32) on the rows of an ExpandSource
//   transpose_floats     dst[j * ld_dst + i] = src[i * ld_src + j], i < rows, j < cols: the
//                        tiled transpose of depthwise_planar.h, for layout_copy.cpp (which
//                        moves any 4-byte elements through it: loads, shuffles and stores
//                        keep every bit)
#define EFFNET_DW_ISA_PASSES(ISA) \
  namespace ISA {                 \
  EFFNET_DW_PASSES(template <typename X>, X)                                                 \
  void expand_forward_rows(const Geo& g, const ExpandSource& e, const Params<float>& p,     \
                           float* out, int64_t r0, int64_t r1, float* row_sums);             \
  void transpose_floats(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,       \
                        int64_t rows, int64_t cols);                                         \
  }
#define EFFNET_DW_INSTANTIATE_PASSES()    \
  EFFNET_DW_PASSES(template, float)       \
  EFFNET_DW_PASSES(template, c10::BFloat16) \
  EFFNET_DW_PASSES(template, c10::Half)
#define EFFNET_DW_INSTANTIATE_FLOAT64_PASSES() EFFNET_DW_PASSES(template, double)

// `&ISA::fn<X>` of the pass `fn` for storage type X: the runtime ISA's, or the baseline's
// for double (the only ISA that instantiates it; a function template, so the other ISAs'
// double passes are never named).
#define EFFNET_DW_PICK_PASS(fn)                                          \
  template <typename X>                                                  \
  auto pick_##fn() {                                                     \
    if constexpr (std::is_same_v<X, double>) {                           \
      return &base::fn<X>;                                               \
    } else {                                                             \
      return EFFNET_PICK_ISA(::effnet::cpu_dw, fn<X>);                   \
    }                                                                    \
  }

#ifdef EFFNET_CPU_X86
EFFNET_DW_ISA_PASSES(avx512)
EFFNET_DW_ISA_PASSES(avx2)
#endif
EFFNET_DW_ISA_PASSES(base)

EFFNET_DW_PICK_PASS(stats_rows)
EFFNET_DW_PICK_PASS(forward_rows)
EFFNET_DW_PICK_PASS(forward_rows_planar)
EFFNET_DW_PICK_PASS(affine_act_rows)
EFFNET_DW_PICK_PASS(reduce_rows)
EFFNET_DW_PICK_PASS(backward_units)

}  // namespace effnet::cpu_dw
