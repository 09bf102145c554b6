// The effnet_kernels._C module: build information plus every primitive that the
// kernel files registered with EFFNET_BINDINGS (see common/binding_registry.h).
#include <torch/extension.h>

#include "common/binding_registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "effnet-kernels compiled primitives (cpu, cuda submodules)";
#ifdef EFFNET_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
#ifdef EFFNET_CUDA_ARCH_LIST
  m.attr("cuda_arch_list") = EFFNET_CUDA_ARCH_LIST;
#else
  m.attr("cuda_arch_list") = "";
#endif
  m.attr("torch_version") = TORCH_VERSION;
  for (auto fn : effnet::binding_registry()) fn(m);
}
