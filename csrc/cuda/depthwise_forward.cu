// CUDA depthwise conv + BatchNorm + activation, pass dw_forward:
// out = act(depthwise_conv(x, w) * scale + shift) in one pass, in x's dtype and layout.
#include "cuda/depthwise_launch.cuh"

namespace effnet {
namespace cuda {

at::Tensor dw_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& scale, const at::Tensor& shift, int64_t stride,
                           int64_t pad_top, int64_t pad_left, int64_t out_h, int64_t out_w,
                           int64_t act) {
  const Problem pr = check_problem(x, weight, stride, pad_top, pad_left, out_h, out_w);
  const at::Tensor sc = check_param(scale, "scale", x), sh = check_param(shift, "shift", x);
  check_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w},
                             x.options().memory_format(pr.fmt));
  if (pr.M == 0 || pr.g.C == 0) return out;
  const at::Tensor w = weight.contiguous();
  const int V = pick_vec(pr, {&x, &out});
  const Plan pl = plan_launch(pr, pr.M, V, kThreads, kManyBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), pr.K, pr.cl, V, [&](auto cfg) {
    using Cf = decltype(cfg);
    using T = typename Cf::T;
    dispatch_act(act, [&](auto ac) {
      constexpr Act A = decltype(ac)::value;
      dw_forward_kernel<T, Cf::K, Cf::V, Cf::CL, A><<<pl.grid, pl.block, 0, stream>>>(
          x.data_ptr<T>(), w.data_ptr<T>(), sc.data_ptr<float>(), sh.data_ptr<float>(), pr.g,
          pl.rows, out.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace cuda
}  // namespace effnet
