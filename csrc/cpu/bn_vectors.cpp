// CPU primitives of the per-channel BatchNorm vector math (formulas: common/bn_channel.h;
// Python composite of the same: effnet_kernels/ops/bn_math.py):
//
//   bn_affine(mean, var, gamma, beta, eps)         -> (invstd, scale, shift)
//   bn_backward_coefs(scale, invstd, sum_g, sum_g_yc, count, training)
//                                                  -> (coef_b, coef_c, dgamma)
//   bn_update_running(running_mean, running_var, mean, var, momentum, count)   in place
//
// One call replaces the 5-10 tiny ATen ops (each a Python dispatch, and on a GPU a kernel
// launch) that the fused BN ops spend per step on C-length vectors. Layout: contiguous 1-D
// vectors of C elements in the accumulation dtype; gamma / beta may be None (1 / 0) or of
// another floating dtype (converted once). Plain loops: C is at most a few thousand.
#include <ATen/Dispatch.h>
#include <torch/extension.h>

#include <tuple>

#include "common/binding_registry.h"
#include "common/bn_channel.h"
#include "common/bn_vectors.h"

namespace effnet::cpu_bn {

using at::Tensor;

static void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

std::tuple<Tensor, Tensor, Tensor> bn_affine(const Tensor& mean, const Tensor& var,
                                             const c10::optional<Tensor>& gamma,
                                             const c10::optional<Tensor>& beta, double eps) {
  check_cpu(mean, "mean");
  bn::check_affine_args(mean, var);
  const Tensor g = bn::acc_param(gamma, "gamma", mean), b = bn::acc_param(beta, "beta", mean);
  Tensor invstd = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_affine", [&] {
    using A = scalar_t;
    const A* m = mean.data_ptr<A>();
    const A* v = var.data_ptr<A>();
    const A* gp = g.defined() ? g.data_ptr<A>() : nullptr;
    const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
    A* inv = invstd.data_ptr<A>();
    A* sc = scale.data_ptr<A>();
    A* sh = shift.data_ptr<A>();
    for (int64_t c = 0; c < mean.numel(); ++c) {
      const auto r = bn::affine<A>(m[c], v[c], gp ? gp[c] : A(1), bp ? bp[c] : A(0), A(eps));
      inv[c] = r.invstd;
      sc[c] = r.scale;
      sh[c] = r.shift;
    }
  });
  return {invstd, scale, shift};
}

std::tuple<Tensor, Tensor, Tensor> bn_backward_coefs(const Tensor& scale, const Tensor& invstd,
                                                     const Tensor& sum_g,
                                                     const Tensor& sum_g_yc, int64_t count,
                                                     bool training) {
  check_cpu(scale, "scale");
  bn::check_backward_args(scale, invstd, sum_g, sum_g_yc, count);
  Tensor coef_b = at::empty_like(scale), coef_c = at::empty_like(scale);
  Tensor dgamma = at::empty_like(scale);
  AT_DISPATCH_FLOATING_TYPES(scale.scalar_type(), "bn_backward_coefs", [&] {
    using A = scalar_t;
    const A* sc = scale.data_ptr<A>();
    const A* inv = invstd.data_ptr<A>();
    const A* sg = sum_g.data_ptr<A>();
    const A* sgy = sum_g_yc.data_ptr<A>();
    A* cb = coef_b.data_ptr<A>();
    A* cc = coef_c.data_ptr<A>();
    A* dg = dgamma.data_ptr<A>();
    const A inv_count = A(1) / A(count);
    for (int64_t c = 0; c < scale.numel(); ++c) {
      const auto r = bn::backward_coefs<A>(sc[c], inv[c], sg[c], sgy[c], inv_count, training);
      cb[c] = r.coef_b;
      cc[c] = r.coef_c;
      dg[c] = r.dgamma;
    }
  });
  return {coef_b, coef_c, dgamma};
}

void bn_update_running(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                       const Tensor& var, double momentum, int64_t count) {
  check_cpu(mean, "mean");
  bn::check_update_args(running_mean, running_var, mean, var, count);
  const double unbias = bn::unbias_factor(count);
  if (!bn::running_stats_direct(running_mean, running_var, mean)) {
    bn::update_running_aten(running_mean, running_var, mean, var, momentum, unbias);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_update_running", [&] {
    using A = scalar_t;
    A* rm = running_mean.data_ptr<A>();
    A* rv = running_var.data_ptr<A>();
    const A* m = mean.data_ptr<A>();
    const A* v = var.data_ptr<A>();
    for (int64_t c = 0; c < mean.numel(); ++c)
      bn::update_running<A>(rm[c], rv[c], m[c], v[c], A(momentum), A(unbias));
  });
  bn::bump_versions(running_mean, running_var);
}

}  // namespace effnet::cpu_bn

EFFNET_BINDINGS(bind_bn_vectors_cpu) {
  namespace py = pybind11;
  namespace bn = effnet::cpu_bn;
  auto cpu = m.def_submodule("cpu");
  cpu.def("bn_affine", &bn::bn_affine,
          "(invstd, scale, shift) with batch_norm(y) = y * scale + shift", py::arg("mean"),
          py::arg("var"), py::arg("gamma"), py::arg("beta"), py::arg("eps"));
  cpu.def("bn_backward_coefs", &bn::bn_backward_coefs,
          "(coef_b, coef_c, dgamma) of the BatchNorm backward from the per-channel sums",
          py::arg("scale"), py::arg("invstd"), py::arg("sum_g"), py::arg("sum_g_yc"),
          py::arg("count"), py::arg("training"));
  cpu.def("bn_update_running", &bn::bn_update_running,
          "running statistics update (unbiased variance), in place", py::arg("running_mean"),
          py::arg("running_var"), py::arg("mean"), py::arg("var"), py::arg("momentum"),
          py::arg("count"));
}
