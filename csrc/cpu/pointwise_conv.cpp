// CPU 1x1 conv + bias + activation for inference, one pass over the output:
//
//   y[(n, h, w), o] = act(sum_i x[(n, h, w), i] * W[o, i] + bias[o])
//
// (pw_conv_act_planar, at the end, is the same for NCHW x: y[n] = W x[n] per image.)
// Layout: x is channels_last (N, Cin, H, W), so its pixels are the rows of a (N*H*W, Cin)
// row-major matrix and y's rows are (N*H*W, Cout): the conv is one GEMM, y = x W^T. W is
// (Cout, Cin) shared by all samples, or (N, Cout, Cin) with one matrix per sample, with a bias
// (Cout) shared by all samples or, for per-sample weights, (N, Cout) with one per sample
// (the squeeze-excite mean's gradient added to the training tail's dx, nn/train_tail.py).
// With a gate (N, Cin) and a shared W, y_n = act((x_n * gate[n]) W^T + bias) is computed
// as x_n (W * gate[n])^T: the eval plan's squeeze-excite gate folded into the projection
// (nn/eval_plan.py) by scaling the rows of the packed W^T per sample
// (XWtProduct::reset_in_scaled), never x.
//
// Why not ATen's conv/GEMM followed by an activation: that is a second full pass over the
// widest activation of the block (read + write), which costs as much as the GEMM itself on
// B0's expand convs. Here the output rows are cut into tiles of about kTileFloats values;
// each parallel task runs one single-threaded GEMM into its tile and applies bias + act
// while the tile is still in L2. With too few tiles to feed every thread, or a shared W so
// large that re-reading it per tile costs more than a second pass over y, one
// multi-threaded GEMM covers all rows and the epilogue runs as a separate parallel loop. The GEMM is
// XWtProduct (packed_gemm.h): the native packed GEMM or the BLAS sgemm_ that libtorch_cpu
// ships, by its policy, packed per call or once (`packed`, packed_weight.h); without sgemm_ `pw_conv_available()` is false and Python keeps
// ATen's path. float32 only.
// The output comes from the output cache (output_cache.h). No autograd: the eval paths
// and the training tail's per-sample products (nn/train_tail.py) call it.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "common/binding_registry.h"
#include "common/checks.h"
#include "gemm_microkernel_decl.h"
#include "output_cache.h"
#include "packed_gemm.h"
#include "packed_weight.h"
#include "pointwise_epilogue_decl.h"
#include "sgemm.h"

namespace effnet::cpu_pw {
namespace {

// Output values per tile: 256 KiB of float, so a tile and its slice of x stay in L2.
constexpr int64_t kTileFloats = int64_t(1) << 16;
// Largest shared W (Cout * Cin floats, 512 KiB) for the tiled path; above it (B0's 7x7
// expand convs and head) the whole GEMM runs first, then the epilogue.
constexpr int64_t kMaxTiledWeightFloats = int64_t(1) << 17;

at::Tensor check_args(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t act,
                      at::MemoryFormat fmt = at::MemoryFormat::ChannelsLast) {
  EFFNET_CHECK_DEVICE(x, at::kCPU);
  EFFNET_CHECK_DTYPE(x, at::kFloat);
  EFFNET_CHECK_DIM(x, 4);
  TORCH_CHECK(x.is_contiguous(fmt), "x must be contiguous in ",
              fmt == at::MemoryFormat::ChannelsLast ? "channels_last" : "NCHW", " format");
  EFFNET_CHECK_DEVICE(weight, at::kCPU);
  EFFNET_CHECK_DTYPE(weight, at::kFloat);
  const int64_t n = x.size(0), cin = x.size(1);
  const bool per_sample = weight.dim() == 3;
  TORCH_CHECK((weight.dim() == 4 && weight.size(1) == cin && weight.size(2) == 1 &&
               weight.size(3) == 1) ||
                  (per_sample && weight.size(0) == n && weight.size(2) == cin),
              "weight must be (Cout, ", cin, ", 1, 1) or per sample (", n, ", Cout, ", cin,
              "), got shape ", weight.sizes());
  const int64_t cout = per_sample ? weight.size(1) : weight.size(0);
  check_act(act);
  // No bias: zeros, which the callers never read when the act is the identity too.
  if (!bias.has_value()) return at::zeros({cout}, x.options());
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.device().is_cpu(), "bias must be on cpu, got ", b.device());
  TORCH_CHECK(b.scalar_type() == at::kFloat, "bias must have dtype float32, got ", b.scalar_type());
  TORCH_CHECK((b.dim() == 1 && b.size(0) == cout) ||
                  (per_sample && b.dim() == 2 && b.size(0) == n && b.size(1) == cout),
              "bias must have shape (Cout,) = (", cout,
              ",) or, with per-sample weights, (N, Cout) = (", n, ", ", cout, "), got shape ",
              b.sizes());
  return b.contiguous();
}

// (tile, tiles per group) for `groups` groups of `span` output pixels of `cout` values
// each: tiles of about kTileFloats values (at least 16 pixels), their count rounded up to
// a multiple of the threads where there are more tiles than threads (7 equal tiles on 2
// threads leave one idle for an eighth of the time). Tiles never cross a group.
std::pair<int64_t, int64_t> split_tiles(int64_t groups, int64_t span, int64_t cout) {
  int64_t tile = std::min(std::max<int64_t>(kTileFloats / cout, 16), span);
  int64_t per_group = (span + tile - 1) / tile;
  const int64_t threads = at::get_num_threads();
  if (groups * per_group > threads) {
    const int64_t total = (groups * per_group + threads - 1) / threads * threads;
    per_group = (total + groups - 1) / groups;
    tile = (span + per_group - 1) / per_group;
    per_group = (span + tile - 1) / tile;
  }
  return {tile, per_group};
}

// gate (N, Cin): the per-sample input-channel scale of pw_conv_act, checked against x.
const float* gate_data(const std::optional<at::Tensor>& gate, const at::Tensor& x,
                       const at::Tensor& weight) {
  if (!gate) return nullptr;
  TORCH_CHECK(weight.dim() == 4, "gate scales a shared (Cout, Cin, 1, 1) weight, got weight shape ",
              weight.sizes());
  EFFNET_CHECK_DEVICE((*gate), at::kCPU);
  TORCH_CHECK(gate->scalar_type() == at::kFloat && gate->dim() == 2 && gate->size(0) == x.size(0) &&
                  gate->size(1) == x.size(1) && gate->is_contiguous(),
              "gate must be a contiguous float32 (N, Cin) = (", x.size(0), ", ", x.size(1),
              ") tensor, got ", gate->scalar_type(), " ", gate->sizes());
  return gate->const_data_ptr<float>();
}

at::Tensor pw_conv_act(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t act,
                       const cpu::PackedWeightPtr& packed, const std::optional<at::Tensor>& gate) {
  TORCH_CHECK(cpu::sgemm_available(), "pw_conv_act: libtorch_cpu exports no sgemm_");
  const at::Tensor b = check_args(x, weight, bias, act);
  const float* gp = gate_data(gate, x, weight);
  const bool per_sample = weight.dim() == 3;
  TORCH_CHECK(!(packed && per_sample), "packed serves a shared weight, not per-sample weights");
  const cpu::XWtProduct* prepacked = packed ? packed->product_for(weight) : nullptr;
  const at::Tensor w = weight.contiguous();
  const int64_t n = x.size(0), cin = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t cout = per_sample ? w.size(1) : w.size(0);
  at::Tensor y = cpu::empty_output({n, cout, x.size(2), x.size(3)}, x.options(),
                                   at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  const int64_t bias_stride = b.dim() == 2 ? cout : 0;  // per-sample bias rows
  float* yp = y.mutable_data_ptr<float>();
  // Without bias and with the identity act the epilogue changes nothing: skip its pass.
  const bool bare = !bias.has_value() && act == 0;
  const auto epilogue = EFFNET_PICK_ISA(cpu_pw, bias_act_rows);

  // The shared weight's product (a gate scales its input channels per sample).
  cpu::XWtProduct own_shared;
  if (!per_sample && !prepacked) own_shared.reset(wp, cout, cin);
  const cpu::XWtProduct& shared = prepacked ? *prepacked : own_shared;
  // Sample g's own product where each sample has one: its weight packed, or the shared
  // product with its gate applied.
  const bool per_group = per_sample || gp != nullptr;
  const auto make_own = [&](cpu::XWtProduct& own, int64_t g) {
    if (per_sample) {
      own.reset(wp + g * cout * cin, cout, cin);
    } else {
      own.reset_in_scaled(shared, gp + g * cin);
    }
  };

  // Tiles never cross a sample boundary when each sample has its own product.
  const int64_t span = per_group ? hw : n * hw;  // rows sharing one product
  const int64_t groups = per_group ? n : 1;
  const auto [tile, tiles_per_group] = split_tiles(groups, span, cout);
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = groups * tiles_per_group;
  // Each tile's GEMM reads all of W; past kMaxTiledWeightFloats that traffic outweighs
  // the second pass over y, and one multi-threaded GEMM is faster.
  const bool tiled = tiles >= 2 * threads && (per_group || cin * cout <= kMaxTiledWeightFloats);
  if (tiled) {
    // Per-sample products are made by each thread for the samples its tiles cover.
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      cpu::XWtProduct own;
      int64_t own_group = -1;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / tiles_per_group;
        const int64_t r0 = g * span + (t % tiles_per_group) * tile;
        const int64_t rows = std::min(tile, (g + 1) * span - r0);
        if (per_group && g != own_group) {
          make_own(own, g);
          own_group = g;
        }
        (per_group ? own : shared)(xp + r0 * cin, yp + r0 * cout, rows);
        if (!bare) epilogue(yp + r0 * cout, rows, cout, bp + g * bias_stride, act);
      }
    });
    return y;
  }
  if (!per_group) {
    shared.parallel(xp, yp, span);
  } else {
    cpu::XWtProduct own;
    for (int64_t g = 0; g < groups; ++g) {
      make_own(own, g);
      own.parallel(xp + g * span * cin, yp + g * span * cout, span);
    }
  }
  if (bare) return y;
  const int64_t rows = n * hw;
  at::parallel_for(0, rows, std::max<int64_t>(1, kTileFloats / (4 * cout)), [&](int64_t r0, int64_t r1) {
    // Split at sample boundaries where each sample has its own bias.
    while (r0 < r1) {
      const int64_t sample = r0 / hw;
      const int64_t end = bias_stride ? std::min(r1, (sample + 1) * hw) : r1;
      epilogue(yp + r0 * cout, end - r0, cout, bp + sample * bias_stride, act);
      r0 = end;
    }
  });
  return y;
}

// act(conv1x1(x, weight) + bias) for an NCHW float32 x: image n's channels are the rows
// of a (Cin, H*W) matrix, so y[n] = W x[n] is one GEMM per image, no layout change.
// Column tiles of about kTileFloats outputs each run a single-threaded GEMM and get bias
// + act while in cache, as pw_conv_act's row tiles; with too few tiles for the threads or
// a W above kMaxTiledWeightFloats, each image's GEMM runs whole and the epilogue after.
at::Tensor pw_conv_act_planar(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t act) {
  TORCH_CHECK(cpu::sgemm_available(), "pw_conv_act_planar: libtorch_cpu exports no sgemm_");
  TORCH_CHECK(weight.dim() == 4, "weight must be (Cout, Cin, 1, 1), got shape ", weight.sizes());
  const at::Tensor b = check_args(x, weight, bias, act, at::MemoryFormat::Contiguous);
  const at::Tensor w = weight.contiguous();
  const int64_t n = x.size(0), cin = x.size(1), hw = x.size(2) * x.size(3), cout = w.size(0);
  at::Tensor y = cpu::empty_output({n, cout, x.size(2), x.size(3)}, x.options());
  if (y.numel() == 0) return y;
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const bool bare = !bias.has_value() && act == 0;  // epilogue would change nothing
  const auto epilogue = EFFNET_PICK_ISA(cpu_pw, bias_act_planar);

  const auto [cols, per_image] = split_tiles(n, hw, cout);
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = n * per_image;
  if (tiles >= 2 * threads && cin * cout <= kMaxTiledWeightFloats) {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t img = t / per_image, j0 = (t % per_image) * cols;
        const int64_t width = std::min(cols, hw - j0);
        float* yt = yp + img * cout * hw + j0;
        cpu::gemm_wx(wp, xp + img * cin * hw + j0, yt, cout, cin, width, hw);
        if (!bare) epilogue(yt, cout, width, hw, bp, act);
      }
    });
    return y;
  }
  for (int64_t img = 0; img < n; ++img) {
    cpu::gemm_wx(wp, xp + img * cin * hw, yp + img * cout * hw, cout, cin, hw, hw);
  }
  if (bare) return y;
  at::parallel_for(0, n * cout, std::max<int64_t>(1, kTileFloats / (4 * hw)),
                   [&](int64_t r0, int64_t r1) {
    // Rows r = img * cout + o, split at image boundaries (the bias restarts there).
    while (r0 < r1) {
      const int64_t img = r0 / cout, o = r0 % cout;
      const int64_t end = std::min(r1, (img + 1) * cout);
      epilogue(yp + r0 * hw, end - r0, hw, hw, bp + o, act);
      r0 = end;
    }
  });
  return y;
}

}  // namespace
}  // namespace effnet::cpu_pw

EFFNET_BINDINGS(bind_pointwise_conv_cpu) {
  namespace py = pybind11;
  namespace pw = effnet::cpu_pw;
  auto cpu = m.def_submodule("cpu");
  cpu.def("pw_conv_act", &pw::pw_conv_act,
          "act(conv1x1(x, weight) + bias) for channels_last float32 x; weight (Cout, Cin, 1, 1) or "
          "per sample (N, Cout, Cin), bias (Cout) or per sample (N, Cout); packed: the shared "
          "weight from pack_weight (packed per call where None or stale); gate (N, Cin): "
          "x's channels scaled per sample, as conv1x1(x * gate[n, c], weight), applied to the "
          "packed shared weight instead of x; no autograd",
          py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("act"),
          py::arg("packed") = py::none(), py::arg("gate") = py::none());
  cpu.def("pw_conv_act_planar", &pw::pw_conv_act_planar,
          "act(conv1x1(x, weight) + bias) for NCHW float32 x (one GEMM per image); weight "
          "(Cout, Cin, 1, 1), bias (Cout); no autograd",
          py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("act"));
  cpu.def("pw_conv_available", &effnet::cpu::sgemm_available,
          "whether the BLAS sgemm that pw_conv_act calls was found in libtorch_cpu");
  cpu.def("gemm_set_mode", &effnet::cpu::set_gemm_mode,
          "the float32 GEMM policy of the 1x1 convs: 'auto', 'native' or 'blas' "
          "(packed_gemm.h); returns the previous one",
          py::arg("mode"));
  cpu.def("gemm_mode", &effnet::cpu::gemm_mode, "the float32 GEMM policy");
  cpu.def("gemm_set_half_vectors", &effnet::cpu_gemm::set_half_vectors,
          "whether the native GEMM's AVX-512 panels take a half vector for their last 8 or "
          "fewer columns (default on; the results are the same bits); returns the previous "
          "setting",
          py::arg("enabled"));
  cpu.def("gemm_native", &effnet::cpu::native_gemm,
          "whether the 1x1 convs' products run on the native packed GEMM now");
}
