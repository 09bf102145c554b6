// CUDA depthwise conv + BatchNorm + activation, pass dw_stats: per-channel batch mean and
// biased variance of y = depthwise_conv(x, w); per-chunk shifted sums in double, merged with
// Chan's formula in double by a second kernel in a fixed order (reduce.cuh).
#include "cuda/depthwise_launch.cuh"

namespace effnet {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> dw_stats_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 int64_t stride, int64_t pad_top,
                                                 int64_t pad_left, int64_t out_h,
                                                 int64_t out_w) {
  const Problem pr = check_problem(x, weight, stride, pad_top, pad_left, out_h, out_w);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fopt = x.options().dtype(at::kFloat);
  const int64_t C = pr.g.C;
  if (pr.M == 0 || C == 0) return {at::zeros({C}, fopt), at::zeros({C}, fopt)};
  const at::Tensor w = weight.contiguous();
  const int V = pick_vec(pr, {&x});
  const Plan pl = plan_launch(pr, pr.M, V, kThreads, kReduceBlocks);
  at::Tensor part = at::empty({pl.chunks, 3, C}, x.options().dtype(at::kDouble));
  at::Tensor mean = at::empty({C}, fopt), var = at::empty({C}, fopt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), pr.K, pr.cl, V, [&](auto cfg) {
    using Cf = decltype(cfg);
    using T = typename Cf::T;
    dw_stats_partial_kernel<T, Cf::K, Cf::V, Cf::CL><<<pl.grid, pl.block, 0, stream>>>(
        x.data_ptr<T>(), w.data_ptr<T>(), pr.g, pl.rows, part.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  merge_shifted_stats_kernel<<<static_cast<unsigned>(ceil_div(C, 256)), 256, 0, stream>>>(
      part.data_ptr<double>(), pl.chunks, pl.rows, pr.M, static_cast<int>(C),
      mean.data_ptr<float>(), var.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

}  // namespace cuda
}  // namespace effnet
