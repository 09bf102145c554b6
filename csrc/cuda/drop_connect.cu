// CUDA primitives of drop-connect + residual add (semantics: effnet_kernels/ops/reference.py):
//
//   dc_forward(x, shortcut, scale)   out = shortcut + x * scale[n]
//   dc_backward(dy, scale)           dx  = dy * scale[n]
//
// Layout: x, shortcut (and dy) are dense in NCHW or channels_last; the batch dimension is
// outermost in both, so sample n owns flat elements [n * S, (n + 1) * S), S = numel / N.
// Each thread handles one 16-byte vector of VEC elements (grid-stride); the vector path is
// taken when every pointer is 16-byte aligned and S % VEC == 0, so no vector straddles two
// samples; otherwise VEC = 1. Offsets are int64. Math in float (double for float64), one
// rounding to the storage type. A dropped sample (scale 0) never reads x or dy.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "cuda/ops.h"

namespace effnet::cuda_dc {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// out = shortcut + x * scale[n] (x == nullptr: dx = dy * scale[n], with s the gradient).
template <typename T, typename A, int VEC, bool kForward>
__global__ void __launch_bounds__(kThreads)
dc_kernel(const T* __restrict__ x,      // forward: x; backward: unused    [numel]
          const T* __restrict__ s,      // forward: shortcut; backward: dy [numel]
          const A* __restrict__ scale,  // per-sample scale                [N]
          T* __restrict__ out,          // out or dx                       [numel]
          int64_t numel, int64_t per_sample) {
  const int64_t nvec = numel / VEC;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += step) {
    const int64_t i = v * VEC;
    const A c = scale[i / per_sample];
    Pack<T, VEC> o;
    if (c == A(0)) {
      // Dropped sample: out = shortcut (forward) or dx = 0 (backward); x and dy are not read.
      if constexpr (kForward) {
        o = reinterpret_cast<const Pack<T, VEC>*>(s)[v];
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = T(A(0));
      }
    } else {
      const Pack<T, VEC> sv = reinterpret_cast<const Pack<T, VEC>*>(s)[v];
      if constexpr (kForward) {
        const Pack<T, VEC> xv = reinterpret_cast<const Pack<T, VEC>*>(x)[v];
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = T(A(sv.v[k]) + A(xv.v[k]) * c);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = T(A(sv.v[k]) * c);
      }
    }
    reinterpret_cast<Pack<T, VEC>*>(out)[v] = o;
  }
}

// The memory format in which t is dense (channels_last only for 4-D NHWC-dense tensors).
at::MemoryFormat flat_format(const at::Tensor& t, const char* name) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  TORCH_CHECK(false, name, " must be dense in NCHW (contiguous) or channels_last format, got "
              "strides ", t.strides());
}

void check_common(const at::Tensor& t, const char* name, const at::Tensor& scale) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(t.dim() >= 1, name, " must have a leading batch dimension, got shape ", t.sizes());
  EFFNET_CHECK_DEVICE(scale, t.device());
  EFFNET_CHECK_DTYPE(scale, acc_type_of(dt));
  EFFNET_CHECK_DIM(scale, 1);
  EFFNET_CHECK_NUMEL(scale, t.size(0));
  EFFNET_CHECK_CONTIGUOUS(scale);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, typename A, bool kForward>
void launch(const T* x, const T* s, const A* scale, T* out, int64_t numel, int64_t per_sample) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = per_sample % kVec == 0 && aligned16(s) && aligned16(out) &&
                   (x == nullptr || aligned16(x));
  const int64_t items = vec ? numel / kVec : numel;
  // Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((items + kThreads - 1) / kThreads, int64_t(sms) * 32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    dc_kernel<T, A, kVec, kForward><<<blocks, kThreads, 0, stream>>>(x, s, scale, out, numel,
                                                                      per_sample);
  } else {
    dc_kernel<T, A, 1, kForward><<<blocks, kThreads, 0, stream>>>(x, s, scale, out, numel,
                                                                   per_sample);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dc_forward(const at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& scale) {
  check_common(x, "x", scale);
  EFFNET_CHECK_DEVICE(shortcut, x.device());
  EFFNET_CHECK_DTYPE(shortcut, x.scalar_type());
  TORCH_CHECK(shortcut.sizes() == x.sizes(), "shortcut must have the shape of x ", x.sizes(),
              ", got ", shortcut.sizes());
  const auto fmt = flat_format(x, "x");
  TORCH_CHECK(shortcut.is_contiguous(fmt), "shortcut must be dense in the memory format of x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dc_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    launch<scalar_t, A, true>(x.const_data_ptr<scalar_t>(), shortcut.const_data_ptr<scalar_t>(),
                              scale.const_data_ptr<A>(), out.mutable_data_ptr<scalar_t>(), numel,
                              numel / x.size(0));
  });
  return out;
}

at::Tensor dc_backward(const at::Tensor& dy, const at::Tensor& scale) {
  check_common(dy, "dy", scale);
  const auto fmt = flat_format(dy, "dy");
  const c10::cuda::CUDAGuard guard(dy.device());
  auto dx = at::empty(dy.sizes(), dy.options().memory_format(fmt));
  const int64_t numel = dy.numel();
  if (numel == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "dc_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    launch<scalar_t, A, false>(nullptr, dy.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
                               dx.mutable_data_ptr<scalar_t>(), numel, numel / dy.size(0));
  });
  return dx;
}

}  // namespace effnet::cuda_dc
