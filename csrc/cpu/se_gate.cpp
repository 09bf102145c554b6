// The eval plan's squeeze-excite gate (effnet_kernels/nn/eval_plan.py) as one call on the
// (N, C) pooled sums of the depthwise pass:
//
//   h[n, r]        = act(sum_k (sums[n, k] / count) * wr_t[k, r] + br[r])     wr_t (C, Cr)
//   gate[n, c]     = sigmoid(sum_r h[n, r] * we_t[r, c] + be[c])              we_t (Cr, C)
//   gated[n, o, c] = rows[o, c] * gate[n, c]       optional: the per-sample projection weights
//
// float32, every matrix row-major and contiguous. The two products are axpy loops over
// the contiguous output row (vectorized by the compiler, one clone per ISA), followed by
// the pointwise conv's bias + act and bias + sigmoid epilogues (pointwise_epilogue.h).
// Why not ATen: at batch 8 x 224^2 the six ATen ops this replaces (div, addmm, silu_,
// addmm, sigmoid_, mul) took about 190 us per B0 block on the 2-core development machine,
// each paying dispatch and setup after the depthwise pass had evicted its code and data
// from the caches; a few thousand multiply-adds need none of that.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/binding_registry.h"
#include "common/checks.h"
#include "output_cache.h"
#include "pointwise_epilogue_decl.h"

namespace effnet::cpu_se {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EFFNET_GATE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EFFNET_GATE_CLONES
#endif

// out[m] = sum_k a[k] * w[k * M + m] for m < M.
EFFNET_GATE_CLONES void vec_mat(const float* __restrict__ a, int64_t K, const float* __restrict__ w,
                                int64_t M, float* __restrict__ out) {
  std::fill(out, out + M, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const float ak = a[k];
    const float* __restrict__ wk = w + k * M;
    for (int64_t m = 0; m < M; ++m) out[m] += ak * wk[m];
  }
}

// out[o, c] = rows[o, c] * gate[c] for `count` rows of C values.
EFFNET_GATE_CLONES void scale_rows(const float* __restrict__ rows, int64_t count, int64_t C,
                                   const float* __restrict__ gate, float* __restrict__ out) {
  for (int64_t o = 0; o < count; ++o) {
    for (int64_t c = 0; c < C; ++c) out[o * C + c] = rows[o * C + c] * gate[c];
  }
}

void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  EFFNET_CHECK_DEVICE(t, at::kCPU);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (",
              rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_vector(const at::Tensor& t, const char* name, int64_t n) {
  EFFNET_CHECK_DEVICE(t, at::kCPU);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>> se_gate_eval(
    const at::Tensor& sums, int64_t count, const at::Tensor& reduce_t, const at::Tensor& reduce_bias,
    const at::Tensor& expand_t, const at::Tensor& expand_bias, int64_t act,
    const std::optional<at::Tensor>& proj_rows) {
  check_act(act);
  TORCH_CHECK(count > 0, "count must be positive, got ", count);
  EFFNET_CHECK_DIM(sums, 2);
  const int64_t N = sums.size(0), C = sums.size(1), Cr = reduce_t.dim() == 2 ? reduce_t.size(1) : -1;
  check_matrix(sums, "sums", N, C);
  check_matrix(reduce_t, "reduce_t", C, Cr);
  check_vector(reduce_bias, "reduce_bias", Cr);
  check_matrix(expand_t, "expand_t", Cr, C);
  check_vector(expand_bias, "expand_bias", C);
  at::Tensor gate = at::empty({N, C}, sums.options());
  std::vector<float> mean(C), hidden(N * Cr);
  const float* s = sums.const_data_ptr<float>();
  float* g = gate.mutable_data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < C; ++k) mean[k] = s[n * C + k] / static_cast<float>(count);
    vec_mat(mean.data(), C, reduce_t.const_data_ptr<float>(), Cr, hidden.data() + n * Cr);
  }
  const auto bias_act = EFFNET_PICK_ISA(cpu_pw, bias_act_rows);
  const auto bias_sigmoid = EFFNET_PICK_ISA(cpu_pw, bias_sigmoid_rows);
  bias_act(hidden.data(), N, Cr, reduce_bias.const_data_ptr<float>(), act);
  for (int64_t n = 0; n < N; ++n) {
    vec_mat(hidden.data() + n * Cr, Cr, expand_t.const_data_ptr<float>(), C, g + n * C);
  }
  bias_sigmoid(g, N, C, expand_bias.const_data_ptr<float>());
  if (!proj_rows) return {gate, std::nullopt};

  const at::Tensor& rows = *proj_rows;
  EFFNET_CHECK_DEVICE(rows, at::kCPU);
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.dim() == 3 && rows.size(0) == 1 &&
                  rows.size(2) == C && rows.is_contiguous(),
              "proj_rows must be a contiguous float32 (1, Cout, ", C, ") tensor, got ",
              rows.scalar_type(), " ", rows.sizes());
  const int64_t cout = rows.size(1);
  at::Tensor gated = cpu::empty_output({N, cout, C}, rows.options());
  const float* r = rows.const_data_ptr<float>();
  float* out = gated.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(cout * C, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) scale_rows(r, cout, C, g + n * C, out + n * cout * C);
  });
  return {gate, gated};
}

}  // namespace effnet::cpu_se

EFFNET_BINDINGS(bind_se_gate_cpu) {
  auto cpu = m.def_submodule("cpu");
  cpu.def("se_gate_eval", &effnet::cpu_se::se_gate_eval,
          "(gate, gated projection rows or None) of the eval plan's squeeze-excite: "
          "sigmoid(act(sums / count @ reduce_t + reduce_bias) @ expand_t + expand_bias)",
          pybind11::arg("sums"), pybind11::arg("count"), pybind11::arg("reduce_t"),
          pybind11::arg("reduce_bias"), pybind11::arg("expand_t"), pybind11::arg("expand_bias"),
          pybind11::arg("act"), pybind11::arg("proj_rows") = std::nullopt);
}
