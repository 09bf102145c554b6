// CPU dense k x k conv + bias + activation for inference, for convs with a small patch
// (EfficientNet's stem: 3 x 3 x 3 input values per output pixel, 32 outputs):
//
//   y[n, oh, ow, o] = act(bias[o] + sum_{kh, kw, i} W[o, kh, kw, i]
//                              * x[n, oh * s - pad_top + kh, ow * s - pad_left + kw, i])
//
// with x read as zero outside the image. Layout: x channels_last (N, Cin, H, W), i.e. NHWC
// rows; W (Cout, Cin, k, k) as nn.Conv2d holds it, reordered per call to (Cout, k, k, Cin)
// (one output channel's patch in the order the taps are read) and packed for the GEMM (a
// few hundred values for a stem); y channels_last (N, Cout, OH, OW).
//
// Why not oneDNN's conv: its output then needs BN + act as another pass over the widest
// early activation (or a post-op, measured slower than the pass for SiLU), and at batch 1
// its per-call setup is a visible share of the conv. Here each output image row is one
// product on the native GEMM with its rows read through tap offsets (XWtProduct::taps:
// row ow of the product is output pixel ow, whose patch value t is at a fixed offset from
// the pixel's window origin), so no patch matrix is written; bias + act run on the row
// while it is in L1. Input rows are first copied, zero padded, into a per-task buffer
// covering a few output rows, which makes every window in bounds. Parallel over output
// rows. float32 only, native GEMM only (patch_conv_available()); no autograd: the eval
// stems call it (nn/eval_conv.py for torchvision's, models/timm_model.py for timm's).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/binding_registry.h"
#include "common/checks.h"
#include "output_cache.h"
#include "packed_gemm.h"
#include "pointwise_epilogue_decl.h"

namespace effnet::cpu_patch {
namespace {

// Output rows per task buffer: the stem's 8 rows at stride 2 cover 17 input rows (46 KiB
// at 224^2), which stay in L1/L2 while their rows' products read them.
constexpr int64_t kRowsPerBuffer = 8;
// The largest patch (k * k * Cin) served: the weight is reordered and packed per call.
constexpr int64_t kMaxTaps = 256;

bool available() { return cpu::gemm_available() && cpu::native_gemm(); }

at::Tensor patch_conv_act(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t stride,
                          int64_t pad_top, int64_t pad_left, int64_t out_h, int64_t out_w,
                          int64_t act) {
  TORCH_CHECK(available(), "patch_conv_act needs the native GEMM (gemm mode 'native' or 'auto' "
              "on a non-Intel AVX2/AVX-512 CPU)");
  EFFNET_CHECK_CPU_FLOAT_NHWC(x);
  EFFNET_CHECK_DEVICE(weight, at::kCPU);
  EFFNET_CHECK_DTYPE(weight, at::kFloat);
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == cin && weight.size(2) == weight.size(3),
              "weight must be (Cout, Cin, k, k) = (Cout, ", cin, ", k, k), got shape ",
              weight.sizes());
  const int64_t cout = weight.size(0), k = weight.size(2), taps = k * k * cin;
  TORCH_CHECK(cout > 0 && k > 0 && taps <= kMaxTaps, "weight must have Cout > 0 and at most ",
              kMaxTaps, " values per output channel, got shape ", weight.sizes());
  TORCH_CHECK(stride >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK(pad_top >= 0 && pad_top < k && pad_left >= 0 && pad_left < k,
              "pad_top and pad_left must be in [0, ", k, "), got ", pad_top, " and ", pad_left);
  TORCH_CHECK(out_h >= 1 && out_w >= 1 && (out_h - 1) * stride - pad_top < h &&
                  (out_w - 1) * stride - pad_left < w,
              "output size (", out_h, ", ", out_w, ") does not fit input size (", h, ", ", w,
              ") with kernel size ", k, ", stride ", stride, " and padding (", pad_top, ", ",
              pad_left, ")");
  check_act(act);
  at::Tensor b = bias.has_value() ? *bias : at::zeros({cout}, x.options());
  TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.dim() == 1 &&
                  b.size(0) == cout,
              "bias must be a float32 cpu tensor of shape (", cout, ",), got ", b.scalar_type(),
              " ", b.sizes());
  b = b.contiguous();

  at::Tensor y = cpu::empty_output({n, cout, out_h, out_w}, x.options(),
                                   at::MemoryFormat::ChannelsLast);
  if (n == 0) return y;
  const at::Tensor ohwi = weight.permute({0, 2, 3, 1}).contiguous();
  cpu::XWtProduct product(ohwi.const_data_ptr<float>(), cout, taps);

  // The buffer holds input columns -pad_left ... (out_w - 1) * stride - pad_left + k - 1.
  const int64_t buf_w = (out_w - 1) * stride + k, row_floats = buf_w * cin;
  std::vector<int64_t> offsets(taps);
  for (int64_t kh = 0, t = 0; kh < k; ++kh) {
    for (int64_t kw = 0; kw < k; ++kw) {
      for (int64_t i = 0; i < cin; ++i) offsets[t++] = kh * row_floats + kw * cin + i;
    }
  }
  // Input columns [col_lo, col_hi) lie inside the image, at buffer column col_lo + pad_left.
  const int64_t col_lo = std::max<int64_t>(0, -pad_left);
  const int64_t col_hi = std::min(w, buf_w - pad_left);
  const float* xp = x.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const auto epilogue = EFFNET_PICK_ISA(cpu_pw, bias_act_rows);
  const bool bare = !bias.has_value() && act == 0;

  const int64_t grain = std::max<int64_t>(1, kRowsPerBuffer / 2);
  at::parallel_for(0, n * out_h, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf;
    while (r0 < r1) {
      const int64_t img = r0 / out_h, oh0 = r0 % out_h;
      const int64_t rows = std::min({r1 - r0, out_h - oh0, kRowsPerBuffer});
      const int64_t in_rows = (rows - 1) * stride + k;
      buf.assign(in_rows * row_floats, 0.0f);
      for (int64_t r = 0; r < in_rows; ++r) {
        const int64_t ih = oh0 * stride - pad_top + r;
        if (ih < 0 || ih >= h || col_hi <= col_lo) continue;
        std::memcpy(buf.data() + r * row_floats + (col_lo + pad_left) * cin,
                    xp + ((img * h + ih) * w + col_lo) * cin, sizeof(float) * (col_hi - col_lo) * cin);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* yrow = yp + ((img * out_h + oh0 + r) * out_w) * cout;
        product.taps(buf.data() + r * stride * row_floats, stride * cin, offsets.data(), yrow, out_w);
        if (!bare) epilogue(yrow, out_w, cout, bp, act);
      }
      r0 += rows;
    }
  });
  return y;
}

}  // namespace
}  // namespace effnet::cpu_patch

EFFNET_BINDINGS(bind_patch_conv_cpu) {
  namespace py = pybind11;
  auto cpu = m.def_submodule("cpu");
  cpu.def("patch_conv_act", &effnet::cpu_patch::patch_conv_act,
          "act(conv2d(x, weight) + bias) for channels_last float32 x and a dense k x k conv "
          "with a small patch (k * k * Cin <= 256), weight (Cout, Cin, k, k); x read as zero "
          "outside the image, pad_top / pad_left its top / left padding and (out_h, out_w) "
          "the output size; no autograd",
          py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride"),
          py::arg("pad_top"), py::arg("pad_left"), py::arg("out_h"), py::arg("out_w"),
          py::arg("act"));
  cpu.def("patch_conv_available", &effnet::cpu_patch::available,
          "whether patch_conv_act runs here (it needs the native GEMM)");
}
