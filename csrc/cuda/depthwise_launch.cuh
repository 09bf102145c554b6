// Host side shared by the CUDA depthwise passes (depthwise_*.cu): argument checks, the
// launch plan, and the dispatch of dtype x kernel size x layout x activation to the kernel
// templates of depthwise_kernels.cuh.
//
// Launch plan (plan_launch): block = (cx, lanes) with cx * lanes = NT threads; grid.x =
// channel groups (cx * V channels each; NCHW: one channel), grid.y = chunks of `rows`
// consecutive pixels (<= 65535). Reductions write one partial per (chunk, channel) and a
// second kernel merges the chunks in a fixed order: results are deterministic.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/math.h"
#include "cuda/ops.h"
#include "cuda/depthwise_kernels.cuh"

namespace effnet {
namespace cuda {

// Pixel indices are int in the kernels; leave headroom for m + lanes and m0 + rows.
constexpr int64_t kMaxPixels = (int64_t{1} << 31) - (int64_t{1} << 24);
constexpr int64_t kMaxDim = int64_t{1} << 24;     // H, W, out sizes, pads, C
constexpr int64_t kReduceBlocks = 1024;           // target blocks of a reduction pass
constexpr int64_t kManyBlocks = int64_t{1} << 40;  // elementwise passes: no target
constexpr int64_t kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Validated geometry of one call; x is dense (NCHW or channels_last).
struct Problem {
  DwGeom g;
  int K;
  bool cl;            // channels_last
  int64_t M, Min;     // output / input pixels per channel (N * OH * OW, N * H * W)
  at::MemoryFormat fmt;
};

inline Problem check_problem(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                      int64_t pad_top, int64_t pad_left, int64_t out_h, int64_t out_w) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  const at::MemoryFormat fmt = activation_format(x, "x");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "x must have dtype float32, float16 or bfloat16, got ", st);
  EFFNET_CHECK_DEVICE(weight, x.device());
  EFFNET_CHECK_DTYPE(weight, st);
  EFFNET_CHECK_DIM(weight, 4);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t k = weight.size(3);
  TORCH_CHECK(weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == k,
              "weight must have shape (C, 1, k, k) with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK(k == 1 || k == 3 || k == 5 || k == 7, "weight: kernel size k must be 1, 3, 5 "
              "or 7, got ", k);
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  TORCH_CHECK(pad_top >= 0 && pad_top < kMaxDim, "pad_top must be in [0, 2^24), got ", pad_top);
  TORCH_CHECK(pad_left >= 0 && pad_left < kMaxDim, "pad_left must be in [0, 2^24), got ",
              pad_left);
  TORCH_CHECK(out_h >= 0 && out_h < kMaxDim, "out_h must be in [0, 2^24), got ", out_h);
  TORCH_CHECK(out_w >= 0 && out_w < kMaxDim, "out_w must be in [0, 2^24), got ", out_w);
  TORCH_CHECK(H < kMaxDim && W < kMaxDim && C < kMaxDim, "x: H, W and C must be < 2^24, got ",
              x.sizes());
  const int64_t M = N * out_h * out_w, Min = N * H * W;
  TORCH_CHECK(M < kMaxPixels && Min < kMaxPixels, "x: N * H * W and N * out_h * out_w must be "
              "< 2^31 - 2^24, got x ", x.sizes(), " and out ", out_h, "x", out_w);
  DwGeom g{static_cast<int>(N), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W),
           static_cast<int>(out_h), static_cast<int>(out_w), static_cast<int>(stride),
           static_cast<int>(pad_top), static_cast<int>(pad_left)};
  return {g, static_cast<int>(k), fmt == at::MemoryFormat::ChannelsLast, M, Min, fmt};
}

// A per-channel float32 parameter (scale, shift, mean, coef_*), made contiguous.
inline at::Tensor check_param(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must have dtype float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == x.size(1), name, " must have C = ", x.size(1), " elements, got shape ",
              t.sizes());
  return t.contiguous();
}

// dy: (N, C, out_h, out_w) on x's device with x's dtype, made dense in x's memory format.
inline at::Tensor check_dy(const at::Tensor& dy, const at::Tensor& x, at::MemoryFormat fmt) {
  TORCH_CHECK(dy.device() == x.device(), "dy must be on ", x.device(), ", got ", dy.device());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "dy must have dtype ", x.scalar_type(),
              " (x's), got ", dy.scalar_type());
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == x.size(0) && dy.size(1) == x.size(1),
              "dy must have shape (N, C, out_h, out_w) with N, C = ", x.size(0), ", ", x.size(1),
              ", got ", dy.sizes());
  return dy.contiguous(fmt);
}

// Vector width: 4 channels per thread when channels_last, C % 4 == 0 and every tensor
// accessed with vectors is aligned to 4 elements; else 1.
inline int pick_vec(const Problem& pr, std::initializer_list<const at::Tensor*> ts) {
  if (!pr.cl || pr.g.C % 4 != 0) return 1;
  for (const at::Tensor* t : ts) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % (4 * t->element_size()) != 0) return 1;
  }
  return 4;
}

// Threads along channels: the largest power of two <= 32 dividing the cv channel vectors
// (no idle threads, contiguous segments of cx * V channels); rounded up instead when that
// would leave segments narrower than 4 vectors.
inline int pick_cx(int64_t cv) {
  int cx = 32;
  while (cx > 1 && cv % cx != 0) cx >>= 1;
  if (cx < 4 && cv > cx) {
    cx = 1;
    while (cx < 32 && cx < cv) cx <<= 1;
  }
  return cx;
}

struct Plan {
  dim3 grid, block;
  int rows, chunks;
};

// Blocks of nt threads over `pixels` pixels x C channels; about max_blocks blocks for a
// reduction (fewer partials), otherwise about 4 pixels per thread.
inline Plan plan_launch(const Problem& pr, int64_t pixels, int V, int nt, int64_t max_blocks) {
  const int64_t C = pr.g.C;
  const int cx = pr.cl ? pick_cx(C / V) : 1;
  const int lanes = nt / cx;
  const int64_t groups = pr.cl ? ceil_div(C / V, cx) : C;
  const int64_t want = std::max<int64_t>(1, max_blocks / groups);
  const int64_t rows = std::max({ceil_div(pixels, want), int64_t{4} * lanes,
                                 ceil_div(pixels, kMaxGridY)});
  const int64_t chunks = ceil_div(pixels, rows);
  return {dim3(static_cast<unsigned>(groups), static_cast<unsigned>(chunks)),
          dim3(static_cast<unsigned>(cx), static_cast<unsigned>(lanes)),
          static_cast<int>(rows), static_cast<int>(chunks)};
}

// Compile-time configuration of a kernel instance: dtype, kernel size, layout, vector width.
template <typename T_, int K_, bool CL_, int V_>
struct Cfg {
  using T = T_;
  static constexpr int K = K_;
  static constexpr bool CL = CL_;
  static constexpr int V = V_;
};

// f(Cfg<T, K, CL, V>{}) for the runtime dtype, k, layout and V (NCHW always has V = 1).
template <typename T, int K, class F>
void dispatch_layout(bool cl, int V, F&& f) {
  if (!cl) return f(Cfg<T, K, false, 1>{});
  if (V == 4) return f(Cfg<T, K, true, 4>{});
  return f(Cfg<T, K, true, 1>{});
}
template <typename T, class F>
void dispatch_k(int k, bool cl, int V, F&& f) {
  switch (k) {
    case 1: return dispatch_layout<T, 1>(cl, V, f);
    case 3: return dispatch_layout<T, 3>(cl, V, f);
    case 5: return dispatch_layout<T, 5>(cl, V, f);
    default: return dispatch_layout<T, 7>(cl, V, f);  // k checked in check_problem
  }
}
template <class F>
void dispatch(at::ScalarType st, int k, bool cl, int V, F&& f) {
  switch (st) {
    case at::kHalf: return dispatch_k<at::Half>(k, cl, V, f);
    case at::kBFloat16: return dispatch_k<at::BFloat16>(k, cl, V, f);
    default: return dispatch_k<float>(k, cl, V, f);  // dtype checked in check_problem
  }
}

// f(integral_constant<Act, A>) for the runtime activation code.
template <class F>
void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case 0: return f(std::integral_constant<Act, Act::Identity>{});
    case 1: return f(std::integral_constant<Act, Act::ReLU>{});
    case 2: return f(std::integral_constant<Act, Act::SiLU>{});
    case 3: return f(std::integral_constant<Act, Act::ReLU6>{});
    default: TORCH_CHECK(false, "act must be 0 (identity), 1 (relu), 2 (silu) or 3 (relu6), got ",
                         act);
  }
}

// Checked inputs of both backward passes: the problem (from x and dy's output size), dy
// dense in x's memory format, and the float32 per-channel scale, shift and mean.
struct BackwardInputs {
  Problem pr;
  at::Tensor dy, scale, shift, mean;
};

inline BackwardInputs check_backward(const at::Tensor& dy, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& scale,
                                     const at::Tensor& shift, const at::Tensor& mean,
                                     int64_t stride, int64_t pad_top, int64_t pad_left,
                                     int64_t act) {
  TORCH_CHECK(dy.dim() == 4, "dy must be 4-D (N, C, out_h, out_w), got shape ", dy.sizes());
  const Problem pr = check_problem(x, weight, stride, pad_top, pad_left, dy.size(2), dy.size(3));
  BackwardInputs in{pr, check_dy(dy, x, pr.fmt), check_param(scale, "scale", x),
                    check_param(shift, "shift", x), check_param(mean, "mean", x)};
  check_act(act);
  return in;
}

// Launch of the second pass of a sum: out[col] = sum over chunks of part[chunk][col].
template <typename Tout>
void launch_sum_chunks(const at::Tensor& part, int chunks, int64_t cols, int64_t split,
                       Tout* out0, Tout* out1, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, 32)));
  sum_chunks_kernel<Tout><<<grid, dim3(32, 8), 0, stream>>>(part.data_ptr<float>(), chunks,
                                                            cols, split, out0, out1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward pointwise kernel over plan `pl`, g = dy * act'(y * scale + shift):
// REDUCE = true writes per-chunk (sum g, sum g * (y - mean)) partials to `part`;
// REDUCE = false writes dyc = scale * g + coef_b + coef_c * (y - mean) to `dyc` (float32).
template <bool REDUCE>
void launch_backward_pointwise(const Problem& pr, const Plan& pl, int V, int64_t act,
                               const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor& sc, const at::Tensor& sh, const at::Tensor& mu,
                               const float* coef_b, const float* coef_c, float* part, float* dyc,
                               cudaStream_t stream) {
  dispatch(x.scalar_type(), pr.K, pr.cl, V, [&](auto cfg) {
    using Cf = decltype(cfg);
    using T = typename Cf::T;
    dispatch_act(act, [&](auto ac) {
      constexpr Act A = decltype(ac)::value;
      dw_backward_pointwise_kernel<T, Cf::K, Cf::V, Cf::CL, A, REDUCE>
          <<<pl.grid, pl.block, 0, stream>>>(
          dy.data_ptr<T>(), x.data_ptr<T>(), w.data_ptr<T>(), sc.data_ptr<float>(),
          sh.data_ptr<float>(), mu.data_ptr<float>(), coef_b, coef_c, pr.g, pl.rows, part, dyc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace effnet
