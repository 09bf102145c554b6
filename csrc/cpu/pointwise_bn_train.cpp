// CPU training 1x1 conv + BatchNorm (batch statistics) + activation, float32, with the
// BatchNorm work done on tiles of the GEMM output while they are in cache:
//
//   y  = x W^T        x (P, Cin), W (Cout, Cin), y (P, Cout): the P = N*H*W pixels of a
//                     channels_last tensor are the rows of a row-major matrix
//   z  = y * scale + shift      (scale = gamma * invstd, shift = beta - mean * scale)
//   out = act(z),  g = dout * act'(z)
//   dy = scale * g + coef_b + coef_c * (y - mean)      (nn/pointwise.py has the BN math)
//   dx = dy W,  dW = dy^T x
//
//   pw_bn_stats(x, w, keep_y)                    -> (mean, biased var, y or None)
//   pw_bn_forward(x, w, scale, shift, act)       -> out
//   pw_bn_backward_reduce(dout, x, w, y, scale, shift, mean, act) -> (sum g, sum g (y - mean))
//   pw_bn_backward(dout, x, w, y, scale, shift, mean, coef_b, coef_c, act, need_dx,
//                  need_dweight)                 -> (dx, dW)
//
// pw_bn_forward's GEMM writes each tile into per-thread scratch, and the epilogue writes
// out with streaming stores (pw_set_streaming).
// y, when given (None: not kept), is the conv output pw_bn_stats kept; otherwise every
// tile recomputes its rows of y from x into a per-thread scratch, so y never goes through
// memory: the forward writes only out, the backward reads only dout (and the narrow x).
// Unfused (GEMM, then BN passes) the forward writes y, reads it twice and writes out, and
// the backward writes y, g and dy, reads y twice, g once and dy twice.
//
// Tiling, checks and the order-fixed merges: pointwise_bn_tiling.h. Where y is
// recomputed, pointwise_bn_gram.cpp has a route that needs one pass less each way.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/binding_registry.h"
#include "depthwise_passes.h"
#include "pointwise_bn_tiling.h"
#include "pointwise_epilogue_decl.h"
#include "sgemm.h"

namespace effnet::cpu_pw {
namespace {

// pw_bn_forward writes out, a fresh activation that the next layer reads from memory,
// with streaming stores from a per-thread scratch tile (the GEMM's output, in L2) instead
// of running the epilogue in place over the GEMM's output in out: the stores then skip the
// read-for-ownership of every line of out. Converted B0 training step, batch 8 x 224^2,
// interleaved in one process: 2.2 ms faster (8 of 8 rounds). The same stores for the
// depthwise backward's dx measured 2 ms slower on the stage-2 shape and were not kept.
// Off: the epilogue in place (A/B runs); the results are bitwise the same.
std::atomic<bool> streaming_enabled{true};

// The backward's whole-dy route for small dL/dy (pointwise_bn_tiling.h, keeps_dy). Off:
// per-group dW partials everywhere (A/B runs; the sums are ordered differently).
std::atomic<bool> kept_dy{true};

// Rows of y for tile t: the kept y's, or recomputed from x into scratch.
const float* tile_y(const Args& a, const Tiling& tl, int64_t t, const float* kept,
                    float* scratch) {
  const int64_t r0 = tl.begin(t);
  if (kept != nullptr) return kept + r0 * a.cout;
  a.xwt(a.x + r0 * a.cin, scratch, tl.count(t));
  return scratch;
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> pw_bn_stats(
    const at::Tensor& x, const at::Tensor& weight, bool keep_y) {
  const Args a = check_x_w(x, weight);
  const Tiling tl = make_tiling(a.rows, a.cin, a.cout);
  std::optional<at::Tensor> y;
  float* yp = nullptr;
  if (keep_y) {
    y = empty_like_out(x, a.cout);
    yp = y->mutable_data_ptr<float>();
  }
  const auto moments = EFFNET_PICK_ISA(cpu_pw, tile_moments);
  const int64_t per_tile = 3 * a.cout;  // each tile's mean, M2 and dev (tile_moments)
  std::vector<float> part(tl.tiles * per_tile);
  for_tiles(tl, keep_y ? 0 : tl.tile * a.cout, [&](int64_t, int64_t t, float* scratch) {
    float* dest = keep_y ? yp + tl.begin(t) * a.cout : scratch;
    a.xwt(a.x + tl.begin(t) * a.cin, dest, tl.count(t));
    float* p = part.data() + t * per_tile;
    moments(dest, tl.count(t), a.cout, p, p + a.cout, p + 2 * a.cout);
  });
  // Chan's merge of the tiles' (count, mean + dev / count, M2), in tile order, in double: total is
  // [count, mean[C], m2[C]] as in the depthwise statistics.
  std::vector<double> total(1 + 2 * a.cout, 0.0);
  for (int64_t t = 0; t < tl.tiles; ++t) {
    const float* p = part.data() + t * per_tile;
    cpu_dw::chan_merge(total.data(), a.cout, double(tl.count(t)), p, p + a.cout, p + 2 * a.cout);
  }
  at::Tensor mean_t = at::empty({a.cout}, x.options()), var_t = at::empty({a.cout}, x.options());
  float* mp = mean_t.mutable_data_ptr<float>();
  float* vp = var_t.mutable_data_ptr<float>();
  for (int64_t c = 0; c < a.cout; ++c) {
    mp[c] = float(total[1 + c]);
    vp[c] = float(total[1 + a.cout + c] / total[0]);
  }
  return {mean_t, var_t, y};
}

at::Tensor pw_bn_forward(const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& scale, const at::Tensor& shift, int64_t act) {
  const Args a = check_x_w(x, weight);
  check_act(act);
  const float* sp = channel_vector(scale, "scale", a.cout);
  const float* hp = channel_vector(shift, "shift", a.cout);
  at::Tensor out = empty_like_out(x, a.cout);
  float* op = out.mutable_data_ptr<float>();
  const Tiling tl = make_tiling(a.rows, a.cin, a.cout);
  const auto affine_act = EFFNET_PICK_ISA(cpu_pw, tile_affine_act);
  const auto affine_act_stream = EFFNET_PICK_ISA(cpu_pw, tile_affine_act_stream);
  const bool stream = streaming_enabled.load(std::memory_order_relaxed);
  for_tiles(tl, stream ? tl.tile * a.cout : 0, [&](int64_t, int64_t t, float* scratch) {
    float* dest = op + tl.begin(t) * a.cout;
    float* z = stream ? scratch : dest;  // the GEMM's output: scratch, or out itself
    a.xwt(a.x + tl.begin(t) * a.cin, z, tl.count(t));
    if (stream) {
      affine_act_stream(z, dest, tl.count(t), a.cout, sp, hp, act);
    } else {
      affine_act(dest, tl.count(t), a.cout, sp, hp, act);
    }
  });
  return out;
}


std::tuple<at::Tensor, at::Tensor> pw_bn_backward_reduce(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& y, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, int64_t act) {
  const BackwardInputs in = check_backward(dout, x, weight, y, scale, shift, mean, act);
  const Args& a = in.a;
  const Tiling tl = make_tiling(a.rows, a.cin, a.cout);
  const auto reduce = EFFNET_PICK_ISA(cpu_pw, tile_bn_reduce);
  std::vector<float> part(tl.tiles * 2 * a.cout, 0.0f);
  for_tiles(tl, in.y_kept ? 0 : tl.tile * a.cout, [&](int64_t, int64_t t, float* scratch) {
    const float* yt = tile_y(a, tl, t, in.y_kept, scratch);
    float* p = part.data() + t * 2 * a.cout;
    reduce(in.dout + tl.begin(t) * a.cout, yt, tl.count(t), a.cout, in.scale, in.shift,
           in.mean, act, p, p + a.cout);
  });
  return merge_tile_sums(part, tl.tiles, a.cout, x.options());
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> pw_bn_backward(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& y, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& coef_b, const at::Tensor& coef_c, int64_t act,
    bool need_dx, bool need_dweight) {
  const BackwardInputs in = check_backward(dout, x, weight, y, scale, shift, mean, act);
  const Args& a = in.a;
  const float* bp = channel_vector(coef_b, "coef_b", a.cout);
  const float* cp = channel_vector(coef_c, "coef_c", a.cout);
  if (!need_dx && !need_dweight) return {std::nullopt, std::nullopt};
  const Tiling tl = backward_tiling(a);
  const auto grad = EFFNET_PICK_ISA(cpu_pw, tile_bn_grad);
  // Scratch: the recomputed y tile, overwritten by dy; with a kept y, dy alone.
  return tiled_input_grads(a, tl, x, need_dx, need_dweight, tl.tile * a.cout,
                           [&](int64_t t, float* scratch) {
    const float* yt = tile_y(a, tl, t, in.y_kept, scratch);
    grad(in.dout + tl.begin(t) * a.cout, yt, scratch, tl.count(t), a.cout, in.scale, in.shift,
         in.mean, bp, cp, act);
    return static_cast<const float*>(scratch);
  });
}

}  // namespace

bool pw_set_streaming(bool enabled) { return streaming_enabled.exchange(enabled); }

bool kept_dy_enabled() { return kept_dy.load(std::memory_order_relaxed); }

bool pw_set_kept_dy(bool enabled) { return kept_dy.exchange(enabled); }

}  // namespace effnet::cpu_pw

EFFNET_BINDINGS(bind_pointwise_bn_train_cpu) {
  namespace py = pybind11;
  namespace pw = effnet::cpu_pw;
  auto cpu = m.def_submodule("cpu");
  cpu.def("pw_bn_stats", &pw::pw_bn_stats,
          "(mean, biased var, y if keep_y) of y = conv1x1(x, weight), weight (Cout, Cin)",
          py::arg("x"), py::arg("weight"), py::arg("keep_y"));
  cpu.def("pw_set_streaming", &pw::pw_set_streaming,
          "pw_bn_forward's streaming stores on or off; returns the previous setting (the "
          "results do not depend on it)",
          py::arg("enabled"));
  cpu.def("pw_set_kept_dy", &pw::pw_set_kept_dy,
          "the backward's whole-dL/dy route for small shapes on or off; returns the previous "
          "setting (the weight gradient's sums are ordered differently)",
          py::arg("enabled"));
  cpu.def("pw_bn_forward", &pw::pw_bn_forward,
          "act(conv1x1(x, weight) * scale + shift), the conv recomputed per tile",
          py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"), py::arg("act"));
  cpu.def("pw_bn_backward_reduce", &pw::pw_bn_backward_reduce,
          "(sum g, sum g * (y - mean)), g = dout * act'(y * scale + shift); y None: recomputed",
          py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("y"), py::arg("scale"),
          py::arg("shift"), py::arg("mean"), py::arg("act"));
  cpu.def("pw_bn_backward", &pw::pw_bn_backward,
          "(dx, dweight) of the conv from dy = scale * g + coef_b + coef_c * (y - mean)",
          py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("y"), py::arg("scale"),
          py::arg("shift"), py::arg("mean"), py::arg("coef_b"), py::arg("coef_c"),
          py::arg("act"), py::arg("need_dx"), py::arg("need_dweight"));
}
