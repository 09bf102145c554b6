// CPU primitives of squeeze-and-excitation (semantics: effnet_kernels/ops/reference.py).
// x and dy are dense (N, C, H, W) tensors in NCHW or channels_last; per-(n, c) vectors
// (sums, gate, dmean) are (N, C) contiguous in the accumulation type A (float, double for
// float64):
//
//   se_pool(x)                       s[n, c]  = sum_hw x
//   se_pool_dy_x(dy, x)              s[n, c]  = sum_hw dy * x
//   se_scale(x, gate)                out      = x * gate[n, c]
//   se_backward_dx(dy, gate, dmean)  dx       = dy * gate[n, c] + dmean[n, c]
//   se_forward / se_backward         the whole op: these passes and the excitation MLP
//   se_gate_eval                     the eval plan's gate from pooled sums (own loops)
//
// Layouts. NCHW: every (n, c) plane is HW contiguous elements; a plane is one scalar
// reduction (kLanes independent partial sums, vectorized, then summed in lane order) or
// one scalar-coefficient elementwise loop. channels_last: a pixel is a row of C contiguous
// channels; work is split into fixed chunks of pixels of one image; reductions write one
// partial row of C sums per chunk, merged in chunk order afterwards. The split depends
// only on the shape, never on the thread count, so every result is deterministic.
//
// ISA: the float32 loops are compiled for AVX-512, AVX2 and baseline x86-64 with GCC's
// target_clones (the loader picks one at runtime; no -march=native). Other dtypes use the
// same templated loops compiled for the baseline.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/binding_registry.h"
#include "common/checks.h"
#include "output_cache.h"
#include "pointwise_epilogue_decl.h"

namespace effnet::cpu_se {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EFFNET_SE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EFFNET_SE_CLONES
#endif
#define EFFNET_SE_INLINE inline __attribute__((always_inline))

constexpr int64_t kTaskElems = 1 << 15;  // elements per parallel task (~128 KiB of float)
constexpr int kLanes = 32;               // partial sums per plane: 2 AVX-512 / 4 AVX2 registers

// ---- loop bodies (templated on storage T and accumulation A) ------------------------------

// sum_i a[i] (* b[i] when kDot) over n contiguous elements.
template <bool kDot, typename T, typename A>
EFFNET_SE_INLINE A plane_reduce(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  A lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const A v = static_cast<A>(a[i + j]);
      lanes[j] += kDot ? v * static_cast<A>(b[i + j]) : v;
    }
  }
  A tail = 0;
  for (; i < n; ++i) {
    tail += kDot ? static_cast<A>(a[i]) * static_cast<A>(b[i]) : static_cast<A>(a[i]);
  }
  A s = 0;
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  return s + tail;
}

// acc[c] += sum_p a[p, c] (* b[p, c]) over `rows` rows of C contiguous channels.
template <bool kDot, typename T, typename A>
EFFNET_SE_INLINE void rows_reduce(const T* __restrict__ a, const T* __restrict__ b, int64_t rows,
                                  int64_t C, A* __restrict__ acc) {
  for (int64_t p = 0; p < rows; ++p) {
    const T* __restrict__ ar = a + p * C;
    const T* __restrict__ br = kDot ? b + p * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const A v = static_cast<A>(ar[c]);
      acc[c] += kDot ? v * static_cast<A>(br[c]) : v;
    }
  }
}

// out[i] = in[i] * g + bias over n contiguous elements.
template <typename T, typename A>
EFFNET_SE_INLINE void plane_affine(const T* __restrict__ in, T* __restrict__ out, int64_t n, A g,
                                   A bias) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<A>(in[i]) * g + bias);
}

// out[p, c] = in[p, c] * g[c] (+ bias[c] when kBias) over `rows` rows of C channels.
template <bool kBias, typename T, typename A>
EFFNET_SE_INLINE void rows_affine(const T* __restrict__ in, T* __restrict__ out, int64_t rows,
                                  int64_t C, const A* __restrict__ g, const A* __restrict__ bias) {
  for (int64_t p = 0; p < rows; ++p) {
    const T* __restrict__ ir = in + p * C;
    T* __restrict__ orow = out + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const A v = static_cast<A>(ir[c]) * g[c];
      orow[c] = static_cast<T>(kBias ? v + bias[c] : v);
    }
  }
}

// ---- float32 entry points, one clone per ISA -------------------------------------------

EFFNET_SE_CLONES float plane_sum_f32(const float* a, int64_t n) {
  return plane_reduce<false, float, float>(a, nullptr, n);
}
EFFNET_SE_CLONES float plane_dot_f32(const float* a, const float* b, int64_t n) {
  return plane_reduce<true, float, float>(a, b, n);
}
EFFNET_SE_CLONES void rows_sum_f32(const float* a, int64_t rows, int64_t C, float* acc) {
  rows_reduce<false, float, float>(a, nullptr, rows, C, acc);
}
EFFNET_SE_CLONES void rows_dot_f32(const float* a, const float* b, int64_t rows, int64_t C,
                                   float* acc) {
  rows_reduce<true, float, float>(a, b, rows, C, acc);
}
EFFNET_SE_CLONES void plane_affine_f32(const float* in, float* out, int64_t n, float g, float b) {
  plane_affine<float, float>(in, out, n, g, b);
}
EFFNET_SE_CLONES void rows_scale_f32(const float* in, float* out, int64_t rows, int64_t C,
                                     const float* g) {
  rows_affine<false, float, float>(in, out, rows, C, g, nullptr);
}
EFFNET_SE_CLONES void rows_affine_f32(const float* in, float* out, int64_t rows, int64_t C,
                                      const float* g, const float* b) {
  rows_affine<true, float, float>(in, out, rows, C, g, b);
}

// out[m] = sum_k a[k] * w[k * M + m] for m < M.
EFFNET_SE_CLONES void vec_mat_f32(const float* __restrict__ a, int64_t K,
                                  const float* __restrict__ w, int64_t M, float* __restrict__ out) {
  std::fill(out, out + M, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const float ak = a[k];
    const float* __restrict__ wk = w + k * M;
    for (int64_t m = 0; m < M; ++m) out[m] += ak * wk[m];
  }
}

// ---- dtype dispatch: float32 goes to the clones, the rest to the generic bodies ----------

template <bool kDot, typename T, typename A>
A plane_reduce_any(const T* a, const T* b, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return kDot ? plane_dot_f32(a, b, n) : plane_sum_f32(a, n);
  } else {
    return plane_reduce<kDot, T, A>(a, b, n);
  }
}

template <bool kDot, typename T, typename A>
void rows_reduce_any(const T* a, const T* b, int64_t rows, int64_t C, A* acc) {
  if constexpr (std::is_same_v<T, float>) {
    kDot ? rows_dot_f32(a, b, rows, C, acc) : rows_sum_f32(a, rows, C, acc);
  } else {
    rows_reduce<kDot, T, A>(a, b, rows, C, acc);
  }
}

template <typename T, typename A>
void plane_affine_any(const T* in, T* out, int64_t n, A g, A b) {
  if constexpr (std::is_same_v<T, float>) {
    plane_affine_f32(in, out, n, g, b);
  } else {
    plane_affine<T, A>(in, out, n, g, b);
  }
}

template <typename T, typename A>
void rows_affine_any(const T* in, T* out, int64_t rows, int64_t C, const A* g, const A* b) {
  if constexpr (std::is_same_v<T, float>) {
    b ? rows_affine_f32(in, out, rows, C, g, b) : rows_scale_f32(in, out, rows, C, g);
  } else if (b) {
    rows_affine<true, T, A>(in, out, rows, C, g, b);
  } else {
    rows_affine<false, T, A>(in, out, rows, C, g, nullptr);
  }
}

// ---- passes -------------------------------------------------------------------------------

// Pixels per channels_last chunk: about kTaskElems elements, at least one pixel.
inline int64_t pixel_chunk(int64_t C) {
  return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(C, 1));
}

// Tasks of `elems` elements each per parallel_for grain, so small calls stay on one thread.
inline int64_t grain_for(int64_t elems) {
  return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(elems, 1));
}

// s[n, c] = sum_hw a (* b). a, b: (N, C, H, W) dense in the same format.
template <bool kDot, typename T, typename A>
void reduce_pass(const T* a, const T* b, bool channels_last, int64_t N, int64_t C, int64_t HW,
                 A* s) {
  if (!channels_last) {
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        s[i] = plane_reduce_any<kDot, T, A>(a + i * HW, kDot ? b + i * HW : nullptr, HW);
      }
    });
    return;
  }
  const int64_t chunk = pixel_chunk(C);
  const int64_t chunks = (HW + chunk - 1) / chunk;
  std::vector<A> part(static_cast<size_t>(N * chunks * C), A(0));  // [n][chunk][c]
  const int64_t grain = grain_for(std::min(chunk, HW) * C);
  at::parallel_for(0, N * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * chunk;
      const int64_t off = (n * HW + p0) * C;
      rows_reduce_any<kDot, T, A>(a + off, kDot ? b + off : nullptr, std::min(chunk, HW - p0), C,
                                  part.data() + t * C);
    }
  });
  // Merge the chunk partials of each image in chunk order.
  at::parallel_for(0, N, grain_for(chunks * C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      A* out = s + n * C;
      std::fill(out, out + C, A(0));
      for (int64_t q = 0; q < chunks; ++q) {
        const A* pr = part.data() + (n * chunks + q) * C;
        for (int64_t c = 0; c < C; ++c) out[c] += pr[c];
      }
    }
  });
}

// out = in * g[n, c] (+ bias[n, c]). g, bias: (N, C) contiguous (bias may be null).
template <typename T, typename A>
void affine_pass(const T* in, T* out, bool channels_last, int64_t N, int64_t C, int64_t HW,
                 const A* g, const A* bias) {
  if (!channels_last) {
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        plane_affine_any<T, A>(in + i * HW, out + i * HW, HW, g[i], bias ? bias[i] : A(0));
      }
    });
    return;
  }
  const int64_t chunk = pixel_chunk(C);
  const int64_t chunks = (HW + chunk - 1) / chunk;
  const int64_t grain = grain_for(std::min(chunk, HW) * C);
  at::parallel_for(0, N * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * chunk;
      const int64_t off = (n * HW + p0) * C;
      rows_affine_any<T, A>(in + off, out + off, std::min(chunk, HW - p0), C, g + n * C,
                            bias ? bias + n * C : nullptr);
    }
  });
}

// ---- bound primitives -------------------------------------------------------------------

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// An (N, C) per-channel vector in the accumulation type of x.
void check_vec(const at::Tensor& v, const char* name, const at::Tensor& x) {
  check_cpu(v, name);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == x.size(1), name,
              " must have shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc_type_of(x.scalar_type()), name, " must have dtype ",
              acc_type_of(x.scalar_type()), ", got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), name, " must be contiguous");
}

// The second activation must match the first in shape, dtype and memory format.
void check_pair(const at::Tensor& t, const char* name, const at::Tensor& x, const char* xname) {
  check_cpu(t, name);
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have the shape of ", xname, " ", x.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(activation_format(t, name) == activation_format(x, xname), name,
              " must have the memory format of ", xname);
}

at::Tensor reduce(const at::Tensor& a, const at::Tensor* b, const char* name) {
  check_cpu(a, "x");
  const bool cl = activation_format(a, "x") == at::MemoryFormat::ChannelsLast;
  if (b) check_pair(*b, name, a, "x");
  const int64_t N = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  auto s = at::zeros({N, C}, a.options().dtype(acc_type_of(a.scalar_type())));
  if (a.numel() == 0) return s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "se_reduce", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* bp = b ? b->const_data_ptr<scalar_t>() : nullptr;
    if (b) {
      reduce_pass<true, scalar_t, A>(a.const_data_ptr<scalar_t>(), bp, cl, N, C, HW,
                                     s.data_ptr<A>());
    } else {
      reduce_pass<false, scalar_t, A>(a.const_data_ptr<scalar_t>(), bp, cl, N, C, HW,
                                      s.data_ptr<A>());
    }
  });
  return s;
}

at::Tensor affine(const at::Tensor& in, const char* in_name, const at::Tensor& g,
                  const at::Tensor* bias) {
  check_cpu(in, in_name);
  const auto fmt = activation_format(in, in_name);
  check_vec(g, "gate", in);
  if (bias) check_vec(*bias, "dmean", in);
  auto out = cpu::empty_output(in.sizes(), in.options(), fmt);
  if (in.numel() == 0) return out;
  const int64_t N = in.size(0), C = in.size(1), HW = in.size(2) * in.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "se_affine", [&] {
    using A = at::opmath_type<scalar_t>;
    affine_pass<scalar_t, A>(in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             fmt == at::MemoryFormat::ChannelsLast, N, C, HW,
                             g.const_data_ptr<A>(), bias ? bias->const_data_ptr<A>() : nullptr);
  });
  return out;
}

at::Tensor se_pool(const at::Tensor& x) { return reduce(x, nullptr, ""); }

at::Tensor se_pool_dy_x(const at::Tensor& dy, const at::Tensor& x) { return reduce(x, &dy, "dy"); }

at::Tensor se_scale(const at::Tensor& x, const at::Tensor& gate) {
  return affine(x, "x", gate, nullptr);
}

at::Tensor se_backward_dx(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& dmean) {
  return affine(dy, "dy", gate, &dmean);
}

// ---- whole forward / backward in one call -------------------------------------------------
//
// The excitation MLP runs on (N, C) vectors with ATen ops, the same ops in the same order as
// ops/squeeze_excite.py (_forward, _backward_math), so results are bitwise those of the
// Python route; one call instead of about twenty Python-level dispatches, which on B0's
// 14x14 and 7x7 SE layers cost more than the passes over the activation.

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

at::Tensor act_forward(const at::Tensor& h, int64_t act) {
  if (act == 1) return at::relu(h);
  if (act == 2) return at::silu(h);
  if (act == 3) return at::hardtanh(h, 0, 6);
  return h;
}

at::Tensor act_backward(const at::Tensor& da, const at::Tensor& h, int64_t act) {
  if (act == 2) return at::silu_backward(da, h);
  if (act == 1) return at::threshold_backward(da, h, 0);
  if (act == 3) return at::hardtanh_backward(da, h, 0, 6);
  return da;
}

// (out, mean, h, gate): mean = sum_hw x / HW (or pooled / HW), h = mean Wr^T + br,
// gate = sigmoid(act(h) We^T + be), out = x * gate[n, c].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> se_forward(
    const at::Tensor& x, const at::Tensor& reduce_weight, const at::Tensor& reduce_bias,
    const at::Tensor& expand_weight, const at::Tensor& expand_bias,
    const std::optional<at::Tensor>& pooled, int64_t act) {
  check_act(act);
  const auto acc = acc_type_of(x.scalar_type());
  const at::Tensor sums = pooled ? in_dtype(*pooled, acc) : se_pool(x);
  const at::Tensor mean = sums / (x.size(2) * x.size(3));
  at::Tensor h = at::linear(mean, in_dtype(reduce_weight, acc).flatten(1), in_dtype(reduce_bias, acc));
  at::Tensor gate = at::sigmoid(at::linear(act_forward(h, act), in_dtype(expand_weight, acc).flatten(1),
                                           in_dtype(expand_bias, acc)));
  return {se_scale(x, gate), mean, h, gate};
}

// (dx, dreduce_weight, dreduce_bias, dexpand_weight, dexpand_bias) from se_forward's saved
// (N, C) vectors; dy and x dense in the same memory format.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> se_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& h,
    const at::Tensor& gate, const at::Tensor& reduce_weight, const at::Tensor& reduce_bias,
    const at::Tensor& expand_weight, const at::Tensor& expand_bias, int64_t act) {
  check_act(act);
  const auto acc = mean.scalar_type();
  const at::Tensor rw = in_dtype(reduce_weight, acc).flatten(1);
  const at::Tensor ew = in_dtype(expand_weight, acc).flatten(1);
  const at::Tensor dgate = se_pool_dy_x(dy, x);
  const at::Tensor dz = at::sigmoid_backward(dgate, gate);
  const at::Tensor dh = act_backward(at::matmul(dz, ew), h, act);
  const at::Tensor dmean = at::matmul(dh, rw).div_(x.size(2) * x.size(3));
  return {se_backward_dx(dy, gate, dmean),
          in_dtype(at::matmul(dh.t(), mean).view_as(reduce_weight), reduce_weight.scalar_type()),
          in_dtype(dh.sum(0), reduce_bias.scalar_type()),
          in_dtype(at::matmul(dz.t(), act_forward(h, act)).view_as(expand_weight),
                   expand_weight.scalar_type()),
          in_dtype(dz.sum(0), expand_bias.scalar_type())};
}

// ---- the eval plan's gate -----------------------------------------------------------------
//
// The eval plan's squeeze-excite gate (effnet_kernels/nn/eval_plan.py) as one call on the
// (N, C) pooled sums of the depthwise pass:
//
//   h[n, r]        = act(sum_k (sums[n, k] / count) * wr_t[k, r] + br[r])     wr_t (C, Cr)
//   gate[n, c]     = sigmoid(sum_r h[n, r] * we_t[r, c] + be[c])              we_t (Cr, C)
//
// float32, every matrix row-major and contiguous. The two products are vec_mat_f32 (axpy
// over the contiguous output row), followed by the pointwise conv's bias + act and bias +
// sigmoid epilogues (pointwise_epilogue.h). The projection applies the gate
// (pw_conv_act's gate argument).
// Why not ATen: at batch 8 x 224^2 the six ATen ops this replaces (div, addmm, silu_,
// addmm, sigmoid_, mul) took about 190 us per B0 block on the 2-core development machine,
// each paying dispatch and setup after the depthwise pass had evicted its code and data
// from the caches; a few thousand multiply-adds need none of that.

void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  EFFNET_CHECK_DEVICE(t, at::kCPU);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (",
              rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_vector(const at::Tensor& t, const char* name, int64_t n) {
  EFFNET_CHECK_DEVICE(t, at::kCPU);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

at::Tensor se_gate_eval(const at::Tensor& sums, int64_t count, const at::Tensor& reduce_t,
                        const at::Tensor& reduce_bias, const at::Tensor& expand_t,
                        const at::Tensor& expand_bias, int64_t act) {
  check_act(act);
  TORCH_CHECK(count > 0, "count must be positive, got ", count);
  EFFNET_CHECK_DIM(sums, 2);
  const int64_t N = sums.size(0), C = sums.size(1), Cr = reduce_t.dim() == 2 ? reduce_t.size(1) : -1;
  check_matrix(sums, "sums", N, C);
  check_matrix(reduce_t, "reduce_t", C, Cr);
  check_vector(reduce_bias, "reduce_bias", Cr);
  check_matrix(expand_t, "expand_t", Cr, C);
  check_vector(expand_bias, "expand_bias", C);
  at::Tensor gate = at::empty({N, C}, sums.options());
  std::vector<float> mean(C), hidden(N * Cr);
  const float* s = sums.const_data_ptr<float>();
  float* g = gate.mutable_data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < C; ++k) mean[k] = s[n * C + k] / static_cast<float>(count);
    vec_mat_f32(mean.data(), C, reduce_t.const_data_ptr<float>(), Cr, hidden.data() + n * Cr);
  }
  const auto bias_act = EFFNET_PICK_ISA(cpu_pw, bias_act_rows);
  const auto bias_sigmoid = EFFNET_PICK_ISA(cpu_pw, bias_sigmoid_rows);
  bias_act(hidden.data(), N, Cr, reduce_bias.const_data_ptr<float>(), act);
  for (int64_t n = 0; n < N; ++n) {
    vec_mat_f32(hidden.data() + n * Cr, Cr, expand_t.const_data_ptr<float>(), C, g + n * C);
  }
  bias_sigmoid(g, N, C, expand_bias.const_data_ptr<float>());
  return gate;
}

}  // namespace effnet::cpu_se

EFFNET_BINDINGS(bind_squeeze_excite_cpu) {
  namespace se = effnet::cpu_se;
  auto cpu = m.def_submodule("cpu");
  cpu.def("se_pool", &se::se_pool, "(N, C) sums over H x W of x", pybind11::arg("x"));
  cpu.def("se_pool_dy_x", &se::se_pool_dy_x, "(N, C) sums over H x W of dy * x",
          pybind11::arg("dy"), pybind11::arg("x"));
  cpu.def("se_scale", &se::se_scale, "x * gate[n, c]", pybind11::arg("x"), pybind11::arg("gate"));
  cpu.def("se_backward_dx", &se::se_backward_dx, "dy * gate[n, c] + dmean[n, c]",
          pybind11::arg("dy"), pybind11::arg("gate"), pybind11::arg("dmean"));
  cpu.def("se_forward", &se::se_forward,
          "(out, mean, h, gate) of squeeze-excite: pool (or pooled sums), MLP, scale",
          pybind11::arg("x"), pybind11::arg("reduce_weight"), pybind11::arg("reduce_bias"),
          pybind11::arg("expand_weight"), pybind11::arg("expand_bias"), pybind11::arg("pooled"),
          pybind11::arg("act"));
  cpu.def("se_gate_eval", &se::se_gate_eval,
          "the eval plan's squeeze-excite gate (N, C): "
          "sigmoid(act(sums / count @ reduce_t + reduce_bias) @ expand_t + expand_bias)",
          pybind11::arg("sums"), pybind11::arg("count"), pybind11::arg("reduce_t"),
          pybind11::arg("reduce_bias"), pybind11::arg("expand_t"), pybind11::arg("expand_bias"),
          pybind11::arg("act"));
  cpu.def("se_backward", &se::se_backward,
          "(dx, dreduce_weight, dreduce_bias, dexpand_weight, dexpand_bias) of squeeze-excite",
          pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("mean"), pybind11::arg("h"),
          pybind11::arg("gate"), pybind11::arg("reduce_weight"), pybind11::arg("reduce_bias"),
          pybind11::arg("expand_weight"), pybind11::arg("expand_bias"), pybind11::arg("act"));
}
