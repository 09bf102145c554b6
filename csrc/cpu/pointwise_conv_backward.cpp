// CPU backward of a plain float32 1x1 conv (no BatchNorm after it: timm's head conv, the
// training 1x1 convs that nn/gemm_conv.py runs as GEMMs):
//
//   dx[p, i] = sum_o dy[p, o] * W[o, i]          dW[o, i] = sum_p dy[p, o] * x[p, i]
//
// Layout: x (N, Cin, H, W) and dy (N, Cout, H, W) channels_last, so their P = N*H*W
// pixels are the rows of row-major (P, Cin) / (P, Cout) matrices; W (Cout, Cin) row-major.
//
// Work split as the tiled conv + BN backward (pointwise_bn_tiling.h): row tiles in fixed
// groups, each tile's dx rows and dW partial from single-threaded GEMMs on the route the
// GEMM policy picks (the native packed GEMM, or BLAS); the group partials are summed in
// group order, so the result depends on the shapes only, not on the thread count. dy is
// read in place (no scratch).
//
// pw_weight_grad_per_sample: M[n] = dy_n^T x_n, (Cout, Cin) per sample n over its H*W
// pixel rows (the training tail's weight-gradient products with the SE gate folded into
// the projection, nn/train_tail.py); samples in parallel, one single-threaded product each.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "common/binding_registry.h"
#include "pointwise_bn_tiling.h"

namespace effnet::cpu_pw {
namespace {

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> pw_conv_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, bool need_dx,
    bool need_dweight) {
  Args a = check_x_w(x, weight, /*pack_xwt=*/false);
  check_like_out(dy, "dy", x, a.cout);
  if (!need_dx && !need_dweight) return {std::nullopt, std::nullopt};
  if (need_dx) a.dx_product.reset_xw(a.w, a.cout, a.cin);
  const float* dyp = dy.const_data_ptr<float>();
  const Tiling tl = backward_tiling(a);
  return tiled_input_grads(a, tl, x, need_dx, need_dweight, 0,
                           [&](int64_t t, float*) { return dyp + tl.begin(t) * a.cout; });
}

at::Tensor pw_weight_grad_per_sample(const at::Tensor& dy, const at::Tensor& x) {
  EFFNET_CHECK_CPU_FLOAT_NHWC(x);
  EFFNET_CHECK_DIM(dy, 4);
  const int64_t n = x.size(0), cin = x.size(1), hw = x.size(2) * x.size(3), cout = dy.size(1);
  check_like_out(dy, "dy", x, cout);
  at::Tensor m = at::empty({n, cout, cin}, x.options());
  if (hw == 0) return m.zero_();
  const float* dyp = dy.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  float* mp = m.mutable_data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      cpu::dtx_product(dyp + s * hw * cout, cout, xp + s * hw * cin, mp + s * cout * cin, hw,
                       cin, cout, false);
    }
  });
  return m;
}

}  // namespace
}  // namespace effnet::cpu_pw

EFFNET_BINDINGS(bind_pointwise_conv_backward_cpu) {
  namespace py = pybind11;
  auto cpu = m.def_submodule("cpu");
  cpu.def("pw_conv_backward", &effnet::cpu_pw::pw_conv_backward,
          "(dx, dweight) of y = conv1x1(x, weight) for its gradient dy: channels_last float32 "
          "x and dy, weight (Cout, Cin); None where not needed",
          py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("need_dx"),
          py::arg("need_dweight"));
  cpu.def("pw_weight_grad_per_sample", &effnet::cpu_pw::pw_weight_grad_per_sample,
          "M[n] = dy_n^T x_n (N, Cout, Cin) over each sample's pixel rows: channels_last "
          "float32 dy (N, Cout, H, W) and x (N, Cin, H, W)",
          py::arg("dy"), py::arg("x"));
}
