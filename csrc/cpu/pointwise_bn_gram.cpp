// CPU training 1x1 conv + BatchNorm + activation where y = x W^T is recomputed, not kept
// (pointwise_bn_train.cpp has the math, pointwise_bn_tiling.h the tiling and the merges):
// the batch-sum terms moved to the narrow input side through its second moments.
//
//   mu = mean_p x_p (Cin),   Gc = sum_p (x_p - mu)(x_p - mu)^T (Cin, Cin),   P pixels
//
//   statistics   mean_y = W mu,   var_y[c] = w_c Gc w_c^T / P         (no conv at all)
//   backward     dy = scale * g + coef_b + coef_c * (y - mean_y) splits into the part
//                s = scale * g, which needs no batch sums, and terms linear in x:
//     dx = s W + (x - mu) M + 1 b^T,        M = W^T diag(coef_c) W (Cin, Cin)
//     dW = s^T x + P beta mu^T + diag(coef_c) W Gc,                   b = W^T beta,
//     beta = coef_b + coef_c * (W mu - mean_y)   (zero up to rounding; kept for exactness)
//
//   pw_bn_stats_gram(x, w)      -> (mean_y, var_y, mu, Gc)           one pass over x
//   pw_bn_backward_gram(dout, x, w, scale, shift, mean_y, act, need_dx, need_dweight)
//                               -> (sum g, sum g (y - mean_y), s W or None, s^T x or None)
//                                  one pass: per tile y, then g, the sums and s in cache,
//                                  then the tile's two GEMMs
//   pw_bn_gram_finish(x, dx, w, mu, Gc, mean_y, coef_b, coef_c, dw_partial)
//                               -> dW or None; dx (if given) += (x - mu) M + b in place
//
// Against the two-pass route this drops a conv (GEMM) and the read of dout of the
// statistics-dependent pass; what it adds works on (P, Cin) and (Cin, Cin) tensors only.
// mu and Gc are merged from per-tile sums of x - x0 (x0: the mean of the first rows, a
// shift that keeps the float32 tile sums free of cancellation) in a fixed order in double;
// the (Cout, Cin) and (Cin, Cin) products run in double. Results depend on the shapes
// only, not on the thread count.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/binding_registry.h"
#include "common/checks.h"
#include "pointwise_bn_tiling.h"
#include "pointwise_epilogue_decl.h"
#include "sgemm.h"

namespace effnet::cpu_pw {

// Loops compiled per ISA by the loader's pick (target_clones, as in drop_connect.cpp);
// clones need external linkage, so these live outside the anonymous namespace.
namespace gram_loops {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EFFNET_GRAM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EFFNET_GRAM_CLONES
#endif

// dst[r][k] = src[r][k] - shift[k] for rows r of width cin; sums[k] += dst[r][k] where
// sums is given.
EFFNET_GRAM_CLONES void shifted_rows(const float* src, const float* shift, float* dst,
                                     int64_t rows, int64_t cin, float* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cin; ++k) dst[r * cin + k] = src[r * cin + k] - shift[k];
    if (sums != nullptr) {
      for (int64_t k = 0; k < cin; ++k) sums[k] += dst[r * cin + k];
    }
  }
}

// The small products in double, in a fixed order (no BLAS: its results may depend on
// the thread count). w (cout, cin) float, gram (cin, cin) and the results double.

// wg[c][k] = sum_j w[c][j] gram[j][k]
EFFNET_GRAM_CLONES void weight_gram_row(const float* w, const double* gram, double* wg,
                                        int64_t cin) {
  std::fill(wg, wg + cin, 0.0);
  for (int64_t j = 0; j < cin; ++j) {
    const double v = double(w[j]);
    for (int64_t k = 0; k < cin; ++k) wg[k] += v * gram[j * cin + k];
  }
}

// m[j][k] = sum_c w[c][j] coef[c] w[c][k] for rows j in [j0, j1)
EFFNET_GRAM_CLONES void weighted_gram_rows(const float* w, const double* coef, double* m,
                                           int64_t cout, int64_t cin, int64_t j0, int64_t j1) {
  std::fill(m + j0 * cin, m + j1 * cin, 0.0);
  for (int64_t c = 0; c < cout; ++c) {
    const float* wc = w + c * cin;
    for (int64_t j = j0; j < j1; ++j) {
      const double v = double(wc[j]) * coef[c];
      for (int64_t k = 0; k < cin; ++k) m[j * cin + k] += v * double(wc[k]);
    }
  }
}

}  // namespace gram_loops

namespace {

using gram_loops::shifted_rows;
using gram_loops::weight_gram_row;
using gram_loops::weighted_gram_rows;

// Rows averaged for the shift x0.
constexpr int64_t kShiftRows = 256;

// (Cout, Cin) float64 w @ gram, rows in parallel (each row on one thread: no reordering).
at::Tensor weight_gram(const float* w, const double* gram, int64_t cout, int64_t cin,
                       const at::TensorOptions& f64) {
  at::Tensor wg = at::empty({cout, cin}, f64);
  double* out = wg.mutable_data_ptr<double>();
  at::parallel_for(0, cout, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) weight_gram_row(w + c * cin, gram, out + c * cin, cin);
  });
  return wg;
}

// (w mu)[c] = sum_k w[c][k] mu[k]
std::vector<double> weight_times(const float* w, const double* mu, int64_t cout, int64_t cin) {
  std::vector<double> out(cout, 0.0);
  for (int64_t c = 0; c < cout; ++c) {
    for (int64_t k = 0; k < cin; ++k) out[c] += double(w[c * cin + k]) * mu[k];
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_bn_stats_gram(
    const at::Tensor& x, const at::Tensor& weight) {
  const Args a = check_x_w(x, weight);
  const int64_t cin = a.cin;
  std::vector<float> shift(cin, 0.0f);
  {
    const int64_t n = std::min(a.rows, kShiftRows);
    std::vector<double> acc(cin, 0.0);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t k = 0; k < cin; ++k) acc[k] += double(a.x[r * cin + k]);
    }
    for (int64_t k = 0; k < cin; ++k) shift[k] = float(acc[k] / double(n));
  }
  // Each group (one thread, its tiles in order) adds its tiles' float32 sums and Gram
  // matrices of x - x0 into its own double partial; the partials are merged in group
  // order. Memory: groups * (Cin + Cin^2) doubles, whatever the number of tiles.
  const Tiling tl = make_tiling(a.rows, cin, cin);
  std::vector<double> group_sums(tl.groups * cin, 0.0), group_grams(tl.groups * cin * cin, 0.0);
  for_tiles(tl, tl.tile * cin + cin * cin + cin, [&](int64_t g, int64_t t, float* scratch) {
    float* xs = scratch;
    float* tile_gram = xs + tl.tile * cin;
    float* tile_sums = tile_gram + cin * cin;
    std::fill(tile_sums, tile_sums + cin, 0.0f);
    shifted_rows(a.x + tl.begin(t) * cin, shift.data(), xs, tl.count(t), cin, tile_sums);
    cpu::gemm_dtx(xs, cin, xs, tile_gram, tl.count(t), cin, cin, false);
    double* gs = group_sums.data() + g * cin;
    double* gg = group_grams.data() + g * cin * cin;
    for (int64_t k = 0; k < cin; ++k) gs[k] += double(tile_sums[k]);
    for (int64_t i = 0; i < cin * cin; ++i) gg[i] += double(tile_gram[i]);
  });
  // Shifted first and second moments, merged in group order, then centered.
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor mu = at::zeros({cin}, f64), gram = at::zeros({cin, cin}, f64);
  double* m = mu.mutable_data_ptr<double>();
  double* gp = gram.mutable_data_ptr<double>();
  for (int64_t g = 0; g < tl.groups; ++g) {
    for (int64_t k = 0; k < cin; ++k) m[k] += group_sums[g * cin + k];
    for (int64_t i = 0; i < cin * cin; ++i) gp[i] += group_grams[g * cin * cin + i];
  }
  const double count = double(a.rows);
  for (int64_t j = 0; j < cin; ++j) {
    for (int64_t k = 0; k < cin; ++k) gp[j * cin + k] -= m[j] * m[k] / count;
  }
  for (int64_t k = 0; k < cin; ++k) m[k] = m[k] / count + double(shift[k]);
  const at::Tensor wg = weight_gram(a.w, gp, a.cout, cin, f64);
  const double* wgp = wg.const_data_ptr<double>();
  const std::vector<double> wmu = weight_times(a.w, m, a.cout, cin);
  at::Tensor mean_y = at::empty({a.cout}, x.options()), var_y = at::empty({a.cout}, x.options());
  float* mp = mean_y.mutable_data_ptr<float>();
  float* vp = var_y.mutable_data_ptr<float>();
  for (int64_t c = 0; c < a.cout; ++c) {
    double q = 0.0;
    for (int64_t k = 0; k < cin; ++k) q += wgp[c * cin + k] * double(a.w[c * cin + k]);
    mp[c] = float(wmu[c]);
    vp[c] = float(std::max(q, 0.0) / count);
  }
  return {mean_y, var_y, mu, gram};
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>
pw_bn_backward_gram(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
                    int64_t act, bool need_dx, bool need_dweight) {
  const BackwardInputs in = check_backward(dout, x, weight, std::nullopt, scale, shift, mean, act);
  const Args& a = in.a;
  const Tiling tl = backward_tiling(a);
  std::vector<float> part(tl.tiles * 2 * a.cout, 0.0f);
  const auto reduce_scale = EFFNET_PICK_ISA(cpu_pw, tile_bn_reduce_scale);
  // Scratch: the recomputed y tile, overwritten by s = scale * g (the tile's part of dy
  // that needs no batch sums), while the tile's sums are taken.
  auto [dx, dweight] = tiled_input_grads(a, tl, x, need_dx, need_dweight, tl.tile * a.cout,
                                         [&](int64_t t, float* scratch) {
    const int64_t r0 = tl.begin(t);
    a.xwt(a.x + r0 * a.cin, scratch, tl.count(t));
    float* p = part.data() + t * 2 * a.cout;
    reduce_scale(in.dout + r0 * a.cout, scratch, tl.count(t), a.cout, in.scale, in.shift, in.mean,
                 act, p, p + a.cout);
    return static_cast<const float*>(scratch);
  });
  auto [sum_g, sum_g_yc] = merge_tile_sums(part, tl.tiles, a.cout, x.options());
  return {sum_g, sum_g_yc, dx, dweight};
}

// The (Cin) or (Cin, Cin) float64 input moments of pw_bn_stats_gram, checked.
void check_moments(const at::Tensor& mu, const at::Tensor& gram, int64_t cin) {
  TORCH_CHECK(mu.device().is_cpu() && mu.scalar_type() == at::kDouble && mu.dim() == 1 &&
                  mu.size(0) == cin,
              "mu must be a float64 cpu (", cin, ") tensor, got ", mu.scalar_type(), " ",
              mu.sizes(), " on ", mu.device());
  TORCH_CHECK(gram.device().is_cpu() && gram.scalar_type() == at::kDouble && gram.dim() == 2 &&
                  gram.size(0) == cin && gram.size(1) == cin,
              "gram must be a float64 cpu (", cin, ", ", cin, ") tensor, got ",
              gram.scalar_type(), " ", gram.sizes(), " on ", gram.device());
}

std::optional<at::Tensor> pw_bn_gram_finish(const at::Tensor& x,
                                            const std::optional<at::Tensor>& dx,
                                            const at::Tensor& weight, const at::Tensor& mu,
                                            const at::Tensor& gram, const at::Tensor& mean,
                                            const at::Tensor& coef_b, const at::Tensor& coef_c,
                                            const std::optional<at::Tensor>& dw_partial) {
  const Args a = check_x_w(x, weight);
  check_moments(mu, gram, a.cin);
  channel_vector(mean, "mean", a.cout);
  channel_vector(coef_b, "coef_b", a.cout);
  channel_vector(coef_c, "coef_c", a.cout);
  if (dx.has_value()) check_like_out(*dx, "dx", x, a.cin);
  if (dw_partial.has_value()) {
    EFFNET_CHECK_DTYPE((*dw_partial), at::kFloat);
    TORCH_CHECK(dw_partial->device().is_cpu() && dw_partial->sizes() == weight.sizes() &&
                    dw_partial->is_contiguous(),
                "dw_partial must be a contiguous cpu tensor shaped like weight ", weight.sizes(),
                ", got ", dw_partial->sizes());
  }
  const int64_t cin = a.cin, cout = a.cout;
  const double* mup = mu.const_data_ptr<double>();
  const float* cbp = coef_b.const_data_ptr<float>();
  const float* mean_p = mean.const_data_ptr<float>();
  const float* ccp = coef_c.const_data_ptr<float>();
  std::vector<double> cc(cout), beta(cout);
  const std::vector<double> wmu = weight_times(a.w, mup, cout, cin);
  for (int64_t c = 0; c < cout; ++c) {
    cc[c] = double(ccp[c]);
    beta[c] = double(cbp[c]) + cc[c] * (wmu[c] - double(mean_p[c]));
  }
  std::optional<at::Tensor> dweight;
  if (dw_partial.has_value()) {
    const at::Tensor wg = weight_gram(a.w, gram.const_data_ptr<double>(), cout, cin,
                                      mu.options());
    const double* wgp = wg.const_data_ptr<double>();
    dweight = at::empty({cout, cin}, x.options());
    const float* part = dw_partial->const_data_ptr<float>();
    float* out = dweight->mutable_data_ptr<float>();
    const double count = double(a.rows);
    for (int64_t c = 0; c < cout; ++c) {
      for (int64_t k = 0; k < cin; ++k) {
        const int64_t i = c * cin + k;
        out[i] = float(double(part[i]) + count * beta[c] * mup[k] + cc[c] * wgp[i]);
      }
    }
  }
  if (dx.has_value()) {
    std::vector<double> md(cin * cin);
    at::parallel_for(0, cin, 8, [&](int64_t j0, int64_t j1) {
      weighted_gram_rows(a.w, cc.data(), md.data(), cout, cin, j0, j1);
    });
    std::vector<float> mf(cin * cin), bf(cin, 0.0f), muf(cin);
    for (int64_t i = 0; i < cin * cin; ++i) mf[i] = float(md[i]);
    for (int64_t k = 0; k < cin; ++k) {
      double b = 0.0;
      for (int64_t c = 0; c < cout; ++c) b += beta[c] * double(a.w[c * cin + k]);
      bf[k] = float(b);
      muf[k] = float(mup[k]);
    }
    float* dxp = dx->mutable_data_ptr<float>();
    const Tiling tl = make_tiling(a.rows, cin, cin);
    for_tiles(tl, tl.tile * cin, [&](int64_t, int64_t t, float* xs) {
      const int64_t r0 = tl.begin(t), rows = tl.count(t);
      shifted_rows(a.x + r0 * cin, muf.data(), xs, rows, cin, nullptr);
      float* d = dxp + r0 * cin;
      cpu::gemm_xw(xs, mf.data(), d, rows, cin, cin, true);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < cin; ++k) d[r * cin + k] += bf[k];
      }
    });
  }
  return dweight;
}

}  // namespace
}  // namespace effnet::cpu_pw

EFFNET_BINDINGS(bind_pointwise_bn_gram_cpu) {
  namespace py = pybind11;
  namespace pw = effnet::cpu_pw;
  auto cpu = m.def_submodule("cpu");
  cpu.def("pw_bn_stats_gram", &pw::pw_bn_stats_gram,
          "(mean, biased var) of y = conv1x1(x, weight) from x's mean mu and centered Gram "
          "matrix, returned too: (mean_y, var_y, mu, gram)",
          py::arg("x"), py::arg("weight"));
  cpu.def("pw_bn_backward_gram", &pw::pw_bn_backward_gram,
          "one pass over dout: (sum g, sum g (y - mean), s W, s^T x), s = scale * g, y "
          "recomputed per tile",
          py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"),
          py::arg("mean"), py::arg("act"), py::arg("need_dx"), py::arg("need_dweight"));
  cpu.def("pw_bn_gram_finish", &pw::pw_bn_gram_finish,
          "adds the batch-sum terms: dx += (x - mu) M + b in place, returns dW from dw_partial",
          py::arg("x"), py::arg("dx"), py::arg("weight"), py::arg("mu"), py::arg("gram"),
          py::arg("mean"), py::arg("coef_b"), py::arg("coef_c"), py::arg("dw_partial"));
}
