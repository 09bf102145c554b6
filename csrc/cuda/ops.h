// Host entry points of the CUDA kernels, bound to Python in bindings.cpp (the only CUDA
// file that includes pybind11 / torch/extension.h, so the kernel files compile fast and in
// parallel). Contracts: effnet_kernels/ops/reference.py. Activations are dense NCHW or
// channels_last, float32 / float16 / bfloat16 (drop-connect and squeeze-excite also
// float64); per-channel and per-sample vectors in the accumulation dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

// Fused depthwise conv + BatchNorm + activation, one pass per file: depthwise_stats.cu,
// depthwise_forward.cu, depthwise_backward_reduce.cu, depthwise_backward.cu.
namespace effnet {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> dw_stats_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 int64_t stride, int64_t pad_top,
                                                 int64_t pad_left, int64_t out_h,
                                                 int64_t out_w);
at::Tensor dw_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& scale, const at::Tensor& shift, int64_t stride,
                           int64_t pad_top, int64_t pad_left, int64_t out_h, int64_t out_w,
                           int64_t act);
std::tuple<at::Tensor, at::Tensor> dw_backward_reduce_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean, int64_t stride,
    int64_t pad_top, int64_t pad_left, int64_t act);
std::tuple<at::Tensor, at::Tensor> dw_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
    const at::Tensor& coef_b, const at::Tensor& coef_c, int64_t stride, int64_t pad_top,
    int64_t pad_left, int64_t act);

}  // namespace cuda
}  // namespace effnet

// Squeeze-excite (squeeze_excite.cu).
namespace effnet::cuda_se {
at::Tensor se_pool(const at::Tensor& x);
at::Tensor se_pool_dy_x(const at::Tensor& dy, const at::Tensor& x);
at::Tensor se_scale(const at::Tensor& x, const at::Tensor& gate);
at::Tensor se_backward_dx(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& dmean);
}  // namespace effnet::cuda_se

// Drop-connect + residual add (drop_connect.cu).
namespace effnet::cuda_dc {
at::Tensor dc_forward(const at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& scale);
at::Tensor dc_backward(const at::Tensor& dy, const at::Tensor& scale);
}  // namespace effnet::cuda_dc

// Per-channel BatchNorm vector math (bn_vectors.cu; formulas in common/bn_channel.h).
namespace effnet::cuda_bn {
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_affine(const at::Tensor& mean,
                                                         const at::Tensor& var,
                                                         const c10::optional<at::Tensor>& gamma,
                                                         const c10::optional<at::Tensor>& beta,
                                                         double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward_coefs(
    const at::Tensor& scale, const at::Tensor& invstd, const at::Tensor& sum_g,
    const at::Tensor& sum_g_yc, int64_t count, bool training);
void bn_update_running(const at::Tensor& running_mean, const at::Tensor& running_var,
                       const at::Tensor& mean, const at::Tensor& var, double momentum,
                       int64_t count);
}  // namespace effnet::cuda_bn
