// Host side of the per-channel BatchNorm vector primitives (bn_affine, bn_backward_coefs,
// bn_update_running), shared by the CPU and CUDA entry points: argument checks and the
// accumulation-dtype views of the optional affine parameters. The per-channel formulas are
// in bn_channel.h; the loops in cpu/bn_vectors.cpp and cuda/bn_vectors.cu.
//
// Every vector is 1-D with C elements on one device. Statistics, sums and results are in
// the accumulation dtype (float32, or float64 for float64 activations) and contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "common/checks.h"

namespace effnet::bn {

// `t` must be a contiguous 1-D accumulation-dtype vector like `like` (same length, dtype
// and device).
inline void check_acc_vector(const at::Tensor& t, const char* name, const at::Tensor& like,
                             const char* like_name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.dim() == 1 && t.numel() == like.numel(), name, " must be 1-D with ",
              like.numel(), " elements (like ", like_name, "), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ",
              like.scalar_type(), " (like ", like_name, "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The first vector of a family: 1-D, float32 or float64, contiguous.
inline void check_lead_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64 (the accumulation dtype), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// gamma / beta in `like`'s dtype and contiguous (a copy only when they are not already);
// an undefined tensor for None, which the loops read as gamma = 1 / beta = 0.
inline at::Tensor acc_param(const c10::optional<at::Tensor>& p, const char* name,
                            const at::Tensor& like) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->dim() == 1 && p->numel() == like.numel(), name, " must be 1-D with ",
              like.numel(), " elements, got shape ", p->sizes());
  TORCH_CHECK(p->device() == like.device(), name, " must be on ", like.device(), ", got ",
              p->device());
  TORCH_CHECK(at::isFloatingType(p->scalar_type()), name, " must be a floating tensor, got ",
              p->scalar_type());
  if (p->scalar_type() != like.scalar_type()) return p->to(like.scalar_type()).contiguous();
  return p->contiguous();
}

// Whether the running statistics can be updated in place by the loops (accumulation dtype,
// contiguous); otherwise the caller falls back to ATen ops.
inline bool running_stats_direct(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean) {
  return running_mean.scalar_type() == mean.scalar_type() &&
         running_var.scalar_type() == mean.scalar_type() && running_mean.is_contiguous() &&
         running_var.is_contiguous();
}

// Writes through data pointers bypass the version counter; bump it as an in-place ATen op
// would, so caches keyed on it (nn/eval_fold.py) see the new statistics.
inline void bump_versions(const at::Tensor& running_mean, const at::Tensor& running_var) {
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
}

// Argument checks of the three entry points (the device is checked by each backend).
inline void check_affine_args(const at::Tensor& mean, const at::Tensor& var) {
  check_lead_vector(mean, "mean");
  check_acc_vector(var, "var", mean, "mean");
}

inline void check_backward_args(const at::Tensor& scale, const at::Tensor& invstd,
                                const at::Tensor& sum_g, const at::Tensor& sum_g_yc,
                                int64_t count) {
  check_lead_vector(scale, "scale");
  check_acc_vector(invstd, "invstd", scale, "scale");
  check_acc_vector(sum_g, "sum_g", scale, "scale");
  check_acc_vector(sum_g_yc, "sum_g_yc", scale, "scale");
  TORCH_CHECK(count >= 1, "count must be positive, got ", count);
}

inline void check_update_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                              const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  check_affine_args(mean, var);
  for (const auto* t : {&running_mean, &running_var}) {
    const char* name = t == &running_mean ? "running_mean" : "running_var";
    TORCH_CHECK(t->dim() == 1 && t->numel() == mean.numel(), name, " must be 1-D with ",
                mean.numel(), " elements, got shape ", t->sizes());
    TORCH_CHECK(t->device() == mean.device(), name, " must be on ", mean.device(), ", got ",
                t->device());
  }
  TORCH_CHECK(count >= 1, "count must be positive, got ", count);
}

// The same update through ATen ops, for running statistics in another dtype (a model cast
// to bfloat16 keeps bfloat16 buffers) or strided: computed in the wider of the two dtypes
// and rounded once into the buffer, as PyTorch does (a float16 buffer then takes a batch
// variance above float16's range, blended, instead of an overflowed inf).
inline void update_running_aten(const at::Tensor& running_mean, const at::Tensor& running_var,
                                const at::Tensor& mean, const at::Tensor& var, double momentum,
                                double unbias) {
  const auto blend = [momentum](const at::Tensor& running, const at::Tensor& batch) {
    const auto dtype = c10::promoteTypes(running.scalar_type(), batch.scalar_type());
    running.copy_(batch.to(dtype).mul(momentum).add_(running.to(dtype).mul(1.0 - momentum)));
  };
  blend(running_mean, mean);
  blend(running_var, var.mul(unbias));
}

// PyTorch's unbiased-variance factor M / (M - 1) (1 when M == 1).
inline double unbias_factor(int64_t count) {
  return static_cast<double>(count) / static_cast<double>(count > 1 ? count - 1 : 1);
}

}  // namespace effnet::bn
