// CUDA depthwise conv + BatchNorm + activation, pass dw_backward_reduce: per-channel
// sum(g) and sum(g * (y - mean)) with g = dy * act'(y * scale + shift), y recomputed from
// x; per-chunk partials summed in a fixed order.
#include "cuda/depthwise_launch.cuh"

namespace effnet {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> dw_backward_reduce_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean, int64_t stride,
    int64_t pad_top, int64_t pad_left, int64_t act) {
  const BackwardInputs in =
      check_backward(dy_in, x, weight, scale, shift, mean, stride, pad_top, pad_left, act);
  const Problem& pr = in.pr;
  const at::Tensor &dy = in.dy, &sc = in.scale, &sh = in.shift, &mu = in.mean;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fopt = x.options().dtype(at::kFloat);
  const int64_t C = pr.g.C;
  if (pr.M == 0 || C == 0) return {at::zeros({C}, fopt), at::zeros({C}, fopt)};
  at::Tensor sum_g = at::empty({C}, fopt), sum_g_yc = at::empty({C}, fopt);
  const at::Tensor w = weight.contiguous();
  const int V = pick_vec(pr, {&x, &dy});
  const Plan pl = plan_launch(pr, pr.M, V, kThreads, kReduceBlocks);
  at::Tensor part = at::empty({pl.chunks, 2 * C}, fopt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_backward_pointwise<true>(pr, pl, V, act, dy, x, w, sc, sh, mu, nullptr, nullptr,
                                  part.data_ptr<float>(), nullptr, stream);
  launch_sum_chunks<float>(part, pl.chunks, 2 * C, C, sum_g.data_ptr<float>(),
                           sum_g_yc.data_ptr<float>(), stream);
  return {sum_g, sum_g_yc};
}

}  // namespace cuda
}  // namespace effnet
