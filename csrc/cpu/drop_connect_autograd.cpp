// Drop-connect + residual add as one C++ autograd node, for eager CPU training calls.
//
//   forward   scale[n] = mask[n] / keep, mask ~ Bernoulli(keep), keep = 1 - p
//             out      = shortcut + x * scale[n]                    (dc_forward)
//   backward  dx = dy * scale[n]  (dc_backward),   dshortcut = dy   (no copy)
//   saved     scale only (N values in the accumulation type)
//
// Why C++: on EfficientNet's residual tensors (75k-600k elements) the kernels take ~10 us,
// while a Python autograd.Function costs several times that per step (node creation,
// and a Python backward entered from the engine with the GIL). This node runs the same
// primitives as the custom ops (drop_connect.cpp); effnet_kernels/ops/drop_connect.py
// takes it only for plain eager calls, and traced code keeps seeing the custom ops.
//
// The mask is drawn exactly as drop_connect.drop_scale draws it (a float32 bernoulli_ on
// the given or default CPU generator, then one division by keep in the accumulation type),
// so one seed gives one mask on every route. Layout: x decides the memory format (NCHW, or
// channels_last for 4-D NHWC-strided x); shortcut and dy are made dense in it.
#include <torch/autograd.h>
#include <torch/extension.h>

#include <optional>

#include "common/binding_registry.h"
#include "drop_connect.h"

namespace effnet::cpu_dc {
namespace {

at::MemoryFormat format_of(const at::Tensor& x) {
  if (x.dim() != 4 || x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.stride(1) == 1) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// The division is the one ATen's div_ does for a tensor of the accumulation type and a
// scalar (one IEEE division in that type), written as a loop: on N values ATen's dispatch
// would cost more than the rest of the op's host work.
template <typename A>
at::Tensor drop_scale(int64_t n, double p, std::optional<at::Generator> gen) {
  const double keep = 1.0 - p;
  auto mask = at::empty({n}, at::TensorOptions().dtype(at::kFloat)).bernoulli_(keep, gen);
  auto scale = at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
  const float* m = mask.template const_data_ptr<float>();
  A* out = scale.template mutable_data_ptr<A>();
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(m[i]) / static_cast<A>(keep);
  return scale;
}

// dy * scale[n] with ATen ops, differentiable in dy (double backward).
at::Tensor scale_differentiable(const at::Tensor& dy, const at::Tensor& scale) {
  std::vector<int64_t> shape(dy.dim(), 1);
  shape[0] = dy.size(0);
  return dy * scale.view(shape).to(dy.scalar_type());
}

struct DropConnectAdd : public torch::autograd::Function<DropConnectAdd> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& shortcut, const at::Tensor& scale) {
    const auto fmt = format_of(x);
    ctx->save_for_backward({scale});
    ctx->saved_data["channels_last"] = fmt == at::MemoryFormat::ChannelsLast;
    return dc_forward(x.contiguous(fmt), shortcut.contiguous(fmt), scale);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto scale = ctx->get_saved_variables()[0];
    const at::Tensor& dy = grads[0];
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) {
      const auto fmt = ctx->saved_data["channels_last"].toBool() ? at::MemoryFormat::ChannelsLast
                                                                  : at::MemoryFormat::Contiguous;
      dx = at::GradMode::is_enabled() ? scale_differentiable(dy, scale)
                                      : dc_backward(dy.contiguous(fmt), scale);
    }
    return {dx, ctx->needs_input_grad(1) ? dy : at::Tensor(), at::Tensor()};
  }
};

// The checked Python entry (drop_connect.drop_connect_add) has validated shapes, dtypes,
// devices and p; the primitives re-check what their loops rely on.
at::Tensor dc_add_train(const at::Tensor& x, const at::Tensor& shortcut, double p,
                        std::optional<at::Generator> generator) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  TORCH_CHECK(x.dim() >= 1, "x must have a leading batch dimension, got shape ", x.sizes());
  const auto scale = x.scalar_type() == at::kDouble
                         ? drop_scale<double>(x.size(0), p, std::move(generator))
                         : drop_scale<float>(x.size(0), p, std::move(generator));
  return DropConnectAdd::apply(x, shortcut, scale);
}

}  // namespace
}  // namespace effnet::cpu_dc

EFFNET_BINDINGS(bind_drop_connect_autograd_cpu) {
  auto cpu = m.def_submodule("cpu");
  cpu.def("dc_add_train", &effnet::cpu_dc::dc_add_train,
          "shortcut + x * Bernoulli(1 - p)[n] / (1 - p) as one C++ autograd node",
          pybind11::arg("x"), pybind11::arg("shortcut"), pybind11::arg("p"),
          pybind11::arg("generator") = std::nullopt);
}
