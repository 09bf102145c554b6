// Self-registration of pybind11 bindings.
//
// Each kernel file binds its own primitives with EFFNET_BINDINGS(name) { ... };
// csrc/bindings.cpp runs every registered function when the module loads, so adding
// an op never touches a central list. Function-local static storage avoids the
// static-initialization-order problem between translation units.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace effnet {

using BindingFn = void (*)(pybind11::module_&);

inline std::vector<BindingFn>& binding_registry() {
  static std::vector<BindingFn> fns;
  return fns;
}

struct BindingRegistrar {
  explicit BindingRegistrar(BindingFn fn) { binding_registry().push_back(fn); }
};

}  // namespace effnet

#define EFFNET_BINDINGS(name)                                                  \
  static void name(pybind11::module_& m);                                     \
  static const ::effnet::BindingRegistrar name##_registrar(&name);            \
  static void name(pybind11::module_& m)
