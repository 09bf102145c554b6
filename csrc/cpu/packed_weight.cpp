// PackedWeight (packed_weight.h) and its binding, `_C.cpu.pack_weight(weight)`.
#include "packed_weight.h"

#include <torch/extension.h>

#include "common/binding_registry.h"
#include "common/checks.h"

namespace effnet::cpu {

PackedWeight::PackedWeight(const at::Tensor& weight) {
  EFFNET_CHECK_DEVICE(weight, at::kCPU);
  EFFNET_CHECK_DTYPE(weight, at::kFloat);
  TORCH_CHECK((weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1) ||
                  weight.dim() == 2,
              "weight must be (Cout, Cin, 1, 1) or (Cout, Cin), got shape ", weight.sizes());
  TORCH_CHECK(weight.numel() > 0, "weight must be non-empty, got shape ", weight.sizes());
  TORCH_CHECK(gemm_available(), "pack_weight: no float32 GEMM (no sgemm_ in libtorch_cpu, no AVX2)");
  cout_ = weight.size(0);
  cin_ = weight.size(1);
  weight_ = weight.reshape({cout_, cin_}).contiguous();
  // Inference tensors have no version counter: such a weight is never served (its
  // values could change unseen).
  version_ = weight.is_inference() ? -1 : int64_t(weight._version());
  native_ = native_gemm();
  product_.reset(weight_.const_data_ptr<float>(), cout_, cin_);
}

const XWtProduct* PackedWeight::product_for(const at::Tensor& w) const {
  TORCH_CHECK(w.size(0) == cout_ && w.numel() == cout_ * cin_,
              "packed must be made from this weight: it holds a (", cout_, ", ", cin_,
              ") weight, got shape ", w.sizes());
  const bool same = version_ >= 0 && !w.is_inference() && w.is_contiguous() &&
                    w.const_data_ptr() == weight_.const_data_ptr() &&
                    int64_t(w._version()) == version_;
  return same && native_ == native_gemm() ? &product_ : nullptr;
}

}  // namespace effnet::cpu

EFFNET_BINDINGS(bind_packed_weight_cpu) {
  namespace py = pybind11;
  using effnet::cpu::PackedWeight;
  auto cpu = m.def_submodule("cpu");
  py::class_<PackedWeight, std::shared_ptr<PackedWeight>>(
      cpu, "PackedWeight",
      "a 1x1 conv weight packed for pw_conv_act / dw_expand_forward (packed_weight.h)")
      .def_property_readonly("cout", &PackedWeight::cout)
      .def_property_readonly("cin", &PackedWeight::cin);
  cpu.def("pack_weight", [](const at::Tensor& weight) {
            return std::make_shared<PackedWeight>(weight);
          },
          "the weight (Cout, Cin, 1, 1) or (Cout, Cin) packed once for pw_conv_act's and "
          "dw_expand_forward's `packed` argument; serves while the weight is unchanged",
          py::arg("weight"));
}
