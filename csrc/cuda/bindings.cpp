// Python bindings of the CUDA kernels (declared in ops.h): the one CUDA-side file that
// includes pybind11, so the kernel files stay free of it.
#include "common/binding_registry.h"
#include "cuda/ops.h"

EFFNET_BINDINGS(bind_cuda_depthwise) {
  namespace py = pybind11;
  using namespace effnet::cuda;
  auto cuda = m.def_submodule("cuda");
  cuda.def("dw_stats", &dw_stats_cuda, "batch mean and biased var of depthwise_conv(x, weight)",
           py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("pad_top"),
           py::arg("pad_left"), py::arg("out_h"), py::arg("out_w"));
  cuda.def("dw_forward", &dw_forward_cuda, "act(depthwise_conv(x, weight) * scale + shift)",
           py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"),
           py::arg("stride"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out_h"),
           py::arg("out_w"), py::arg("act"));
  cuda.def("dw_backward_reduce", &dw_backward_reduce_cuda,
           "per-channel sum(g) and sum(g * (y - mean)), g = dy * act'(y * scale + shift)",
           py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"),
           py::arg("mean"), py::arg("stride"), py::arg("pad_top"), py::arg("pad_left"),
           py::arg("act"));
  cuda.def("dw_backward", &dw_backward_cuda, "(dx, dweight) of the fused op",
           py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"),
           py::arg("mean"), py::arg("coef_b"), py::arg("coef_c"), py::arg("stride"),
           py::arg("pad_top"), py::arg("pad_left"), py::arg("act"));
}

EFFNET_BINDINGS(bind_squeeze_excite_cuda) {
  namespace se = effnet::cuda_se;
  auto cuda = m.def_submodule("cuda");
  cuda.def("se_pool", &se::se_pool, "(N, C) sums over H x W of x", pybind11::arg("x"));
  cuda.def("se_pool_dy_x", &se::se_pool_dy_x, "(N, C) sums over H x W of dy * x",
           pybind11::arg("dy"), pybind11::arg("x"));
  cuda.def("se_scale", &se::se_scale, "x * gate[n, c]", pybind11::arg("x"), pybind11::arg("gate"));
  cuda.def("se_backward_dx", &se::se_backward_dx, "dy * gate[n, c] + dmean[n, c]",
           pybind11::arg("dy"), pybind11::arg("gate"), pybind11::arg("dmean"));
}

EFFNET_BINDINGS(bind_drop_connect_cuda) {
  auto cuda = m.def_submodule("cuda");
  cuda.def("dc_forward", &effnet::cuda_dc::dc_forward, "out = shortcut + x * scale[n]",
           pybind11::arg("x"), pybind11::arg("shortcut"), pybind11::arg("scale"));
  cuda.def("dc_backward", &effnet::cuda_dc::dc_backward, "dx = dy * scale[n]",
           pybind11::arg("dy"), pybind11::arg("scale"));
}

EFFNET_BINDINGS(bind_bn_vectors_cuda) {
  namespace py = pybind11;
  namespace bn = effnet::cuda_bn;
  auto cuda = m.def_submodule("cuda");
  cuda.def("bn_affine", &bn::bn_affine,
           "(invstd, scale, shift) with batch_norm(y) = y * scale + shift", py::arg("mean"),
           py::arg("var"), py::arg("gamma"), py::arg("beta"), py::arg("eps"));
  cuda.def("bn_backward_coefs", &bn::bn_backward_coefs,
           "(coef_b, coef_c, dgamma) of the BatchNorm backward from the per-channel sums",
           py::arg("scale"), py::arg("invstd"), py::arg("sum_g"), py::arg("sum_g_yc"),
           py::arg("count"), py::arg("training"));
  cuda.def("bn_update_running", &bn::bn_update_running,
           "running statistics update (unbiased variance), in place", py::arg("running_mean"),
           py::arg("running_var"), py::arg("mean"), py::arg("var"), py::arg("momentum"),
           py::arg("count"));
}
