// CUDA primitives of the per-channel BatchNorm vector math (formulas: common/bn_channel.h,
// shared with the CPU loops in cpu/bn_vectors.cpp; contracts in cuda/ops.h):
//
//   bn_affine(mean, var, gamma, beta, eps)         -> (invstd, scale, shift)
//   bn_backward_coefs(scale, invstd, sum_g, sum_g_yc, count, training)
//                                                  -> (coef_b, coef_c, dgamma)
//   bn_update_running(running_mean, running_var, mean, var, momentum, count)   in place
//
// One launch each, replacing 3-8 elementwise launches of the same math on C-length
// vectors. Layout: contiguous 1-D accumulation-dtype vectors; one thread per channel,
// grid-stride over C.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "common/bn_channel.h"
#include "common/bn_vectors.h"
#include "cuda/ops.h"

namespace effnet::cuda_bn {

using at::Tensor;

constexpr int kThreads = 256;

static unsigned blocks_for(int64_t c) {
  const int64_t blocks = std::min<int64_t>((c + kThreads - 1) / kThreads, 1024);
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

template <typename A>
__global__ void bn_affine_kernel(const A* __restrict__ mean, const A* __restrict__ var,
                                 const A* __restrict__ gamma, const A* __restrict__ beta,
                                 A eps, int64_t C, A* __restrict__ invstd,
                                 A* __restrict__ scale, A* __restrict__ shift) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    const auto r = bn::affine<A>(mean[c], var[c], gamma ? gamma[c] : A(1),
                                 beta ? beta[c] : A(0), eps);
    invstd[c] = r.invstd;
    scale[c] = r.scale;
    shift[c] = r.shift;
  }
}

template <typename A>
__global__ void bn_backward_coefs_kernel(const A* __restrict__ scale,
                                         const A* __restrict__ invstd,
                                         const A* __restrict__ sum_g,
                                         const A* __restrict__ sum_g_yc, A inv_count,
                                         bool training, int64_t C, A* __restrict__ coef_b,
                                         A* __restrict__ coef_c, A* __restrict__ dgamma) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    const auto r = bn::backward_coefs<A>(scale[c], invstd[c], sum_g[c], sum_g_yc[c], inv_count,
                                         training);
    coef_b[c] = r.coef_b;
    coef_c[c] = r.coef_c;
    dgamma[c] = r.dgamma;
  }
}

template <typename A>
__global__ void bn_update_running_kernel(A* __restrict__ running_mean,
                                         A* __restrict__ running_var,
                                         const A* __restrict__ mean, const A* __restrict__ var,
                                         A momentum, A unbias, int64_t C) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    bn::update_running<A>(running_mean[c], running_var[c], mean[c], var[c], momentum, unbias);
  }
}

static void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

std::tuple<Tensor, Tensor, Tensor> bn_affine(const Tensor& mean, const Tensor& var,
                                             const c10::optional<Tensor>& gamma,
                                             const c10::optional<Tensor>& beta, double eps) {
  check_cuda(mean, "mean");
  bn::check_affine_args(mean, var);
  const c10::cuda::CUDAGuard guard(mean.device());
  const Tensor g = bn::acc_param(gamma, "gamma", mean), b = bn::acc_param(beta, "beta", mean);
  Tensor invstd = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean);
  const int64_t C = mean.numel();
  if (C == 0) return {invstd, scale, shift};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_affine_cuda", [&] {
    using A = scalar_t;
    bn_affine_kernel<A><<<blocks_for(C), kThreads, 0, stream>>>(
        mean.data_ptr<A>(), var.data_ptr<A>(), g.defined() ? g.data_ptr<A>() : nullptr,
        b.defined() ? b.data_ptr<A>() : nullptr, A(eps), C, invstd.data_ptr<A>(),
        scale.data_ptr<A>(), shift.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {invstd, scale, shift};
}

std::tuple<Tensor, Tensor, Tensor> bn_backward_coefs(const Tensor& scale, const Tensor& invstd,
                                                     const Tensor& sum_g,
                                                     const Tensor& sum_g_yc, int64_t count,
                                                     bool training) {
  check_cuda(scale, "scale");
  bn::check_backward_args(scale, invstd, sum_g, sum_g_yc, count);
  const c10::cuda::CUDAGuard guard(scale.device());
  Tensor coef_b = at::empty_like(scale), coef_c = at::empty_like(scale);
  Tensor dgamma = at::empty_like(scale);
  const int64_t C = scale.numel();
  if (C == 0) return {coef_b, coef_c, dgamma};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(scale.scalar_type(), "bn_backward_coefs_cuda", [&] {
    using A = scalar_t;
    bn_backward_coefs_kernel<A><<<blocks_for(C), kThreads, 0, stream>>>(
        scale.data_ptr<A>(), invstd.data_ptr<A>(), sum_g.data_ptr<A>(), sum_g_yc.data_ptr<A>(),
        A(1) / A(count), training, C, coef_b.data_ptr<A>(), coef_c.data_ptr<A>(),
        dgamma.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {coef_b, coef_c, dgamma};
}

void bn_update_running(const Tensor& running_mean, const Tensor& running_var,
                       const Tensor& mean, const Tensor& var, double momentum, int64_t count) {
  check_cuda(mean, "mean");
  bn::check_update_args(running_mean, running_var, mean, var, count);
  const c10::cuda::CUDAGuard guard(mean.device());
  const double unbias = bn::unbias_factor(count);
  if (!bn::running_stats_direct(running_mean, running_var, mean)) {
    bn::update_running_aten(running_mean, running_var, mean, var, momentum, unbias);
    return;
  }
  const int64_t C = mean.numel();
  if (C > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_update_running_cuda", [&] {
      using A = scalar_t;
      bn_update_running_kernel<A><<<blocks_for(C), kThreads, 0, stream>>>(
          running_mean.data_ptr<A>(), running_var.data_ptr<A>(), mean.data_ptr<A>(),
          var.data_ptr<A>(), A(momentum), A(unbias), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  bn::bump_versions(running_mean, running_var);
}

}  // namespace effnet::cuda_bn
