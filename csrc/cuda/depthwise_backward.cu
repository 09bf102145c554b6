// CUDA depthwise conv + BatchNorm + activation, pass dw_backward:
// dyc = scale * g + coef_b + coef_c * (y - mean) (float32, in dy's layout), then
// dx = gather of dyc over the taps, dweight = per-chunk correlation partials of x and dyc
// summed in a fixed order.
#include "cuda/depthwise_launch.cuh"

namespace effnet {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> dw_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
    const at::Tensor& coef_b, const at::Tensor& coef_c, int64_t stride, int64_t pad_top,
    int64_t pad_left, int64_t act) {
  const BackwardInputs in =
      check_backward(dy_in, x, weight, scale, shift, mean, stride, pad_top, pad_left, act);
  const Problem& pr = in.pr;
  const at::Tensor &dy = in.dy, &sc = in.scale, &sh = in.shift, &mu = in.mean;
  const at::Tensor cb = check_param(coef_b, "coef_b", x), cc = check_param(coef_c, "coef_c", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = pr.g.C, KK = int64_t{pr.K} * pr.K;
  if (pr.M == 0 || C == 0) {
    return {at::zeros(x.sizes(), x.options().memory_format(pr.fmt)),
            at::zeros(weight.sizes(), weight.options())};
  }
  const at::Tensor w = weight.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 1. dyc = scale * g + coef_b + coef_c * (y - mean), float32 in dy's layout.
  at::Tensor dyc = at::empty(dy.sizes(), dy.options().dtype(at::kFloat).memory_format(pr.fmt));
  const int V1 = pick_vec(pr, {&x, &dy});
  const Plan p1 = plan_launch(pr, pr.M, V1, kThreads, kManyBlocks);
  launch_backward_pointwise<false>(pr, p1, V1, act, dy, x, w, sc, sh, mu, cb.data_ptr<float>(),
                                   cc.data_ptr<float>(), nullptr, dyc.data_ptr<float>(), stream);
  // 2. dx: gather of dyc over the taps (every input pixel written, zeros where no tap).
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(pr.fmt));
  if (pr.Min > 0) {
    const int V2 = pick_vec(pr, {&dx, &dyc});
    const Plan p2 = plan_launch(pr, pr.Min, V2, kThreads, kManyBlocks);
    dispatch(x.scalar_type(), pr.K, pr.cl, V2, [&](auto cfg) {
      using Cf = decltype(cfg);
      using T = typename Cf::T;
      dw_dx_kernel<T, Cf::K, Cf::V, Cf::CL><<<p2.grid, p2.block, 0, stream>>>(
          dyc.data_ptr<float>(), w.data_ptr<T>(), pr.g, p2.rows, dx.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // 3. dweight: per-chunk partials [chunks][C * K*K], then a fixed-order sum over chunks.
  at::Tensor dweight = at::empty(weight.sizes(), weight.options());  // contiguous (C,1,k,k)
  const Plan p3 = plan_launch(pr, pr.M, 1, kDwThreads, kReduceBlocks);
  at::Tensor part = at::empty({p3.chunks, C * KK}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), pr.K, pr.cl, 1, [&](auto cfg) {
    using Cf = decltype(cfg);
    using T = typename Cf::T;
    dw_dweight_partial_kernel<T, Cf::K, Cf::CL><<<p3.grid, p3.block, 0, stream>>>(
        x.data_ptr<T>(), dyc.data_ptr<float>(), pr.g, p3.rows, part.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_sum_chunks<T>(part, p3.chunks, C * KK, C * KK, dweight.data_ptr<T>(), nullptr,
                         stream);
  });
  return {dx, dweight};
}

}  // namespace cuda
}  // namespace effnet
