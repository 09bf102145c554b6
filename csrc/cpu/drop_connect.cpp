// CPU primitives of drop-connect + residual add (semantics: effnet_kernels/ops/reference.py,
// op module effnet_kernels/ops/drop_connect.py):
//
//   dc_forward(x, shortcut, scale)   out = shortcut + x * scale[n]
//   dc_backward(dy, scale)           dx  = dy * scale[n]
//
// Layout: x, shortcut (and dy) are dense in NCHW or channels_last (any rank for NCHW). The
// batch dimension is outermost in both formats, so sample n owns the flat elements
// [n * S, (n + 1) * S), S = numel / N: the kernels are flat loops with one scalar per
// segment. A dropped sample (scale 0) is a copy of the shortcut (forward) or a zero fill
// (backward) and never reads x or dy.
//
// Math runs in the accumulation type A (float; double for float64) with one rounding to
// the storage type. bfloat16 and float16 are converted with branch-free integer arithmetic
// (c10's rounding rules), so the loops vectorize. The loops are compiled for AVX-512, AVX2 and baseline x86-64
// with GCC's target_clones (picked at runtime by the loader; no -march=native).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/binding_registry.h"
#include "common/checks.h"
#include "drop_connect.h"
#include "output_cache.h"

namespace effnet::cpu_dc {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EFFNET_DC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EFFNET_DC_CLONES
#endif
#define EFFNET_DC_INLINE inline __attribute__((always_inline))

// ~128 KiB of float per parallel task: large enough to amortize a task, small enough that
// B0's residual tensors (75k-600k elements) split over every core.
constexpr int64_t kTaskElems = 1 << 15;

// ---- storage <-> accumulation conversions (inlined into each ISA clone) -------------------

template <typename A, typename T>
EFFNET_DC_INLINE A to_acc(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t u = uint32_t(v.x) << 16;  // bfloat16 is the high half of a float
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::detail::fp16_ieee_to_fp32_value(v.x);  // branch-free bit arithmetic
  } else {
    return static_cast<A>(v);
  }
}

template <typename T, typename A>
EFFNET_DC_INLINE T from_acc(A a) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // Round to nearest even, NaN -> 0x7FC0 (c10's rule), written branch-free to vectorize.
    uint32_t u;
    std::memcpy(&u, &a, sizeof(u));
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(a != a ? 0x7FC0u : r), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    // c10's own rounding (nearest even), so results match torch's CPU float16 bit for bit.
    return c10::Half(c10::detail::fp16_ieee_from_fp32_value(a), c10::Half::from_bits());
  } else {
    return static_cast<T>(a);
  }
}

// ---- loop bodies over one contiguous segment ------------------------------------------

template <typename T, typename A>
EFFNET_DC_INLINE void fwd_body(const T* __restrict__ x, const T* __restrict__ s,
                               T* __restrict__ out, int64_t n, A scale) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_acc<T>(to_acc<A>(s[i]) + to_acc<A>(x[i]) * scale);
}

template <typename T, typename A>
EFFNET_DC_INLINE void bwd_body(const T* __restrict__ dy, T* __restrict__ dx, int64_t n, A scale) {
  for (int64_t i = 0; i < n; ++i) dx[i] = from_acc<T>(to_acc<A>(dy[i]) * scale);
}

// One non-template multiversioned function per storage type (target_clones needs plain
// functions); T = storage, A = accumulation.
#define EFFNET_DC_LOOPS(T, A, SUFFIX)                                                   \
  EFFNET_DC_CLONES void fwd_##SUFFIX(const T* x, const T* s, T* out, int64_t n, A scale) { \
    fwd_body<T, A>(x, s, out, n, scale);                                                \
  }                                                                                     \
  EFFNET_DC_CLONES void bwd_##SUFFIX(const T* dy, T* dx, int64_t n, A scale) {          \
    bwd_body<T, A>(dy, dx, n, scale);                                                   \
  }
EFFNET_DC_LOOPS(float, float, f32)
EFFNET_DC_LOOPS(double, double, f64)
EFFNET_DC_LOOPS(c10::BFloat16, float, bf16)
EFFNET_DC_LOOPS(c10::Half, float, f16)
#undef EFFNET_DC_LOOPS

template <typename T> struct Loops;
#define EFFNET_DC_TRAITS(T, A, SUFFIX)                                                    \
  template <> struct Loops<T> {                                                          \
    using acc = A;                                                                       \
    static void fwd(const T* x, const T* s, T* o, int64_t n, A c) { fwd_##SUFFIX(x, s, o, n, c); } \
    static void bwd(const T* dy, T* dx, int64_t n, A c) { bwd_##SUFFIX(dy, dx, n, c); }  \
  };
EFFNET_DC_TRAITS(float, float, f32)
EFFNET_DC_TRAITS(double, double, f64)
EFFNET_DC_TRAITS(c10::BFloat16, float, bf16)
EFFNET_DC_TRAITS(c10::Half, float, f16)
#undef EFFNET_DC_TRAITS

// Calls fn(begin, end, scale) for every run of elements of one sample, in parallel.
template <typename A, typename Fn>
void for_each_segment(int64_t numel, int64_t per_sample, const A* scale, const Fn& fn) {
  at::parallel_for(0, numel, kTaskElems, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t n = begin / per_sample;
      const int64_t stop = std::min(end, (n + 1) * per_sample);
      fn(begin, stop, scale[n]);
      begin = stop;
    }
  });
}

// ---- entry points ---------------------------------------------------------------------

// The memory format in which t is dense (channels_last only for 4-D NHWC-dense tensors).
at::MemoryFormat flat_format(const at::Tensor& t, const char* name) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  TORCH_CHECK(false, name, " must be dense in NCHW (contiguous) or channels_last format, got "
              "strides ", t.strides());
}

void check_scale(const at::Tensor& scale, const at::Tensor& t) {
  EFFNET_CHECK_DEVICE(scale, t.device());
  EFFNET_CHECK_DTYPE(scale, acc_type_of(t.scalar_type()));
  EFFNET_CHECK_DIM(scale, 1);
  EFFNET_CHECK_NUMEL(scale, t.dim() > 0 ? t.size(0) : 1);
  EFFNET_CHECK_CONTIGUOUS(scale);
}

void check_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() >= 1, name, " must have a leading batch dimension, got shape ", t.sizes());
}

at::Tensor dc_forward(const at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& scale) {
  check_float(x, "x");
  EFFNET_CHECK_DEVICE(shortcut, x.device());
  EFFNET_CHECK_DTYPE(shortcut, x.scalar_type());
  TORCH_CHECK(shortcut.sizes() == x.sizes(), "shortcut must have the shape of x ", x.sizes(),
              ", got ", shortcut.sizes());
  check_scale(scale, x);
  const auto fmt = flat_format(x, "x");
  TORCH_CHECK(shortcut.is_contiguous(fmt), "shortcut must be dense in the memory format of x");
  auto out = cpu::empty_output(x.sizes(), x.options(), fmt);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t per_sample = numel / x.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dc_forward", [&] {
    using L = Loops<scalar_t>;
    using A = typename L::acc;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = shortcut.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_segment<A>(numel, per_sample, scale.const_data_ptr<A>(),
                        [&](int64_t b, int64_t e, A c) {
      if (c == A(0)) {  // dropped sample: out = shortcut (x * 0 == 0 for finite x)
        std::memcpy(op + b, sp + b, sizeof(scalar_t) * (e - b));
      } else {
        L::fwd(xp + b, sp + b, op + b, e - b, c);
      }
    });
  });
  return out;
}

at::Tensor dc_backward(const at::Tensor& dy, const at::Tensor& scale) {
  check_float(dy, "dy");
  check_scale(scale, dy);
  const auto fmt = flat_format(dy, "dy");
  auto dx = cpu::empty_output(dy.sizes(), dy.options(), fmt);
  const int64_t numel = dy.numel();
  if (numel == 0) return dx;
  const int64_t per_sample = numel / dy.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "dc_backward", [&] {
    using L = Loops<scalar_t>;
    using A = typename L::acc;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    for_each_segment<A>(numel, per_sample, scale.const_data_ptr<A>(),
                        [&](int64_t b, int64_t e, A c) {
      if (c == A(0)) {  // dropped sample: zero gradient, dy is never read
        std::fill(dp + b, dp + e, scalar_t(0));
      } else {
        L::bwd(gp + b, dp + b, e - b, c);
      }
    });
  });
  return dx;
}

}  // namespace effnet::cpu_dc

EFFNET_BINDINGS(bind_drop_connect_cpu) {
  auto cpu = m.def_submodule("cpu");
  cpu.def("dc_forward", &effnet::cpu_dc::dc_forward, "out = shortcut + x * scale[n]",
          pybind11::arg("x"), pybind11::arg("shortcut"), pybind11::arg("scale"));
  cpu.def("dc_backward", &effnet::cpu_dc::dc_backward, "dx = dy * scale[n]",
          pybind11::arg("dy"), pybind11::arg("scale"));
}
