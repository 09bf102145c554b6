// CPU primitives of the fused depthwise conv + BatchNorm + activation (see
// effnet_kernels/ops/reference.py for their exact semantics). Per channel c, with
// y = depthwise_conv(x, weight) and z = y * scale[c] + shift[c]:
//
//   dw_stats            mean[c], biased var[c] of y   (per-row mean/M2, Chan merges)
//   dw_stats_stash      (mean, var, y): float storage keeps y for the next primitive
//   dw_affine_act_      out = act(z) in place on that y: training's forward without a
//                       second conv (dw_affine_act_pool_ adds the pool sums)
//   dw_forward          out = act(z)
//   dw_forward_pool     (out, pooled[n][c] = sum over out's pixels of out): the
//                       squeeze-excite pool as an epilogue of the forward pass
//   dw_expand_forward   dw_forward(_pool) with x = act_e(conv1x1(x_narrow) + bias_e), the
//                       eval expand conv computed per input row and never stored
//   dw_backward_reduce  g = dy * act'(z);  sum_g[c] = sum g,  sum_g_yc[c] = sum g (y - mean)
//   dw_backward_reduce_stash  the same, keeping g (float storage) for dw_backward(g, ...,
//                       act = identity), which then skips act', and with keep_y also y,
//                       which dw_backward(..., y=y) then reads instead of a second conv
//   dw_backward         dyc = scale * g + coef_b + coef_c * (y - mean)
//                       dx = conv_transpose(dyc, weight),  dweight = corr(x, dyc)
//
// Every pass but dw_affine_act_ and a dw_backward given the kept y recomputes y from x
// (design.md §4); y is never saved for backward, only kept from one primitive to the
// next within a forward or a backward call. Kernels run on channels_last data (NCHW
// inputs are converted on entry and outputs converted back, except in dw_forward and
// dw_forward_pool, which transpose NCHW rows in cache: depthwise_planar.h) and
// accumulate in float (double for float64). The row kernels live in
// depthwise_kernels.h (the passes; row access and per-row cores in depthwise_row_access.h
// and depthwise_row_kernels.h), compiled once per ISA (AVX-512, AVX2, baseline) in isa_*.cpp and
// picked at runtime (isa.h); EFFNET_CPU_ISA=avx2 or =base forces a narrower one. float64 always runs the baseline's
// (depthwise_passes.h, EFFNET_DW_PICK_PASS). Threads split fixed work units
// (at::parallel_for) and write per-group partials that are merged in order, so results
// are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/binding_registry.h"
#include "common/checks.h"
#include "common/math.h"
#include "depthwise_passes.h"
#include "isa.h"
#include "layout_copy.h"
#include "output_cache.h"
#include "packed_weight.h"
#include "pointwise_epilogue_decl.h"

namespace effnet::cpu_dw {

namespace {

constexpr int64_t kMaxGroups = 64;

// ---- argument checks ------------------------------------------------------------

// The *_stash primitives keep an intermediate in x's dtype, which is exact only for float
// storage; `keeps` names the primitive and what it keeps.
void check_keepable(const at::Tensor& x, const char* keeps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, keeps,
              " in x's dtype and needs float32 or float64 x, got ", x.scalar_type());
}

// The depthwise weight (C, 1, k, k) of dtype dt on the CPU, and the conv's stride,
// padding and act.
void check_weight_and_geometry(const at::Tensor& weight, int64_t C, at::ScalarType dt,
                               int64_t stride, int64_t pad_top, int64_t pad_left, int64_t act) {
  EFFNET_CHECK_DEVICE(weight, at::kCPU);
  EFFNET_CHECK_DTYPE(weight, dt);
  EFFNET_CHECK_DIM(weight, 4);
  const int64_t k = weight.size(3);
  TORCH_CHECK(weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == k,
              "weight must be (C, 1, k, k) with C = ", C, ", got shape ", weight.sizes());
  TORCH_CHECK(k == 1 || k == 3 || k == 5 || k == 7, "weight kernel size must be 1, 3, 5 or 7, got ",
              k);
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  TORCH_CHECK(pad_top >= 0 && pad_left >= 0, "pad_top and pad_left must be >= 0, got ", pad_top,
              ", ", pad_left);
  check_act(act);
}

at::MemoryFormat check_input(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                             int64_t pad_top, int64_t pad_left, int64_t act) {
  EFFNET_CHECK_DEVICE(x, at::kCPU);
  const auto fmt = activation_format(x, "x");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "x must be float32, float64, bfloat16 or float16, got ", dt);
  check_weight_and_geometry(weight, x.size(1), dt, stride, pad_top, pad_left, act);
  return fmt;
}

// A per-channel vector (scale, shift, ...) in the accumulation type, made contiguous.
at::Tensor per_channel(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  const auto acc = acc_type_of(x.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, name, " must have dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == x.size(1), name, " must have ", x.size(1), " elements, got ",
              t.numel());
  return t.contiguous();
}

// t in memory format fmt: t itself where it already is, else a copy in an output-cache
// block. An NCHW activation of B0's 112x112 layers (38.5 MB at batch 8) is above glibc's
// mmap threshold, so a plain .contiguous(fmt) copy lands on fresh pages every call:
// 14-18 ms per conversion of 8x96x112x112 against 1.7 ms for the 12.8 MB 8x32x112x112
// (2-core AMD EPYC VM), and an NCHW training call converts x, out, dy and dx.
at::Tensor to_format(const at::Tensor& t, at::MemoryFormat fmt) {
  if (t.is_contiguous(fmt)) return t;
  at::Tensor out = cpu::empty_output(t.sizes(), t.options(), fmt);
  cpu::copy_layout(out, t);
  return out;
}

// dy in x's dtype and channels_last layout, checked against x's N and C.
at::Tensor grad_output(const at::Tensor& dy, const at::Tensor& x) {
  EFFNET_CHECK_DEVICE(dy, x.device());
  EFFNET_CHECK_DIM(dy, 4);
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(1) == x.size(1), "dy must be (N, C, out_h, out_w) = (",
              x.size(0), ", ", x.size(1), ", ...), got shape ", dy.sizes());
  const at::Tensor same_dtype = dy.scalar_type() == x.scalar_type() ? dy : dy.to(x.scalar_type());
  return to_format(same_dtype, at::MemoryFormat::ChannelsLast);
}

// Software prefetch in the row kernels (Geo::pf, depthwise_row_access.h): on for float32 and
// float64 tensors of kPrefetchMinBytes and more (B0's 112x112 and 56x56 activations at
// batch 8: 1.2-1.7x faster training passes on the 2-core development machine), off below,
// where the data stays in L2 and the extra instructions cost 5-10 %. The distance is
// kPrefetchAheadBytes of one stream (16 pixels at C = 96). Half types convert rows into
// scratch buffers first, so their kernels never read the tensors directly: off.
constexpr int64_t kPrefetchMinBytes = int64_t(8) << 20;
constexpr int64_t kPrefetchAheadBytes = int64_t(6) << 10;
std::atomic<bool> prefetch_enabled{true};

int64_t prefetch_pixels(const at::Tensor& t, int64_t C) {
  const auto dtype = t.scalar_type();
  if (!prefetch_enabled.load(std::memory_order_relaxed) || C <= 0) return 0;
  if (dtype != at::kFloat && dtype != at::kDouble) return 0;
  const int64_t bytes = t.numel() * int64_t(t.element_size());
  if (bytes < kPrefetchMinBytes) return 0;
  return std::max<int64_t>(1, kPrefetchAheadBytes / (C * int64_t(t.element_size())));
}

// Turns the row kernels' software prefetch on or off (benchmarks compare the two; the
// results are the same bitwise); returns the previous setting.
bool dw_set_prefetch(bool enabled) { return prefetch_enabled.exchange(enabled); }

// Whether dw_forward(_pool) runs NCHW tensors on the planar row kernels (on) or converts
// them to channels_last and back (off; benchmarks and tests compare the two, whose
// results are the same bitwise); returns the previous setting.
std::atomic<bool> planar_enabled{true};
bool dw_set_planar(bool enabled) { return planar_enabled.exchange(enabled); }

Geo make_geo(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t pad_top,
             int64_t pad_left, int64_t out_h, int64_t out_w, int64_t act) {
  TORCH_CHECK(out_h >= 0 && out_w >= 0, "out_h and out_w must be >= 0, got ", out_h, ", ", out_w);
  return Geo{x.size(0), x.size(1), x.size(2), x.size(3), out_h, out_w,
             weight.size(3), stride, pad_top, pad_left, act, prefetch_pixels(x, x.size(1))};
}

// ---- helpers ----------------------------------------------------------------------

// weight (C, 1, K, K) -> wt[kh][kw][c] in the accumulation type.
template <typename X>
std::vector<AccOf<X>> transpose_weight(const at::Tensor& weight) {
  const auto w = weight.contiguous();
  const X* src = w.const_data_ptr<X>();
  const int64_t C = w.size(0), KK = w.size(2) * w.size(3);
  std::vector<AccOf<X>> wt(KK * C);
  // In blocks of 16 channels, whose KK taps (one 1.6 KB run of the source for 5x5) stay in
  // L1 while each tap's 16 values are written: one channel or one tap at a time, every
  // read or every write went to another cache line. perf, per B0 training step on the
  // calling thread: 1.2 ms with either plain loop order, 0.85 ms blocked (mostly reading
  // the weight, cold after the optimizer step).
  constexpr int64_t kChannelBlock = 16;
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
    const int64_t c1 = std::min(C, c0 + kChannelBlock);
    for (int64_t t = 0; t < KK; ++t) {
      AccOf<X>* dst = wt.data() + t * C;
      for (int64_t c = c0; c < c1; ++c) dst[c] = static_cast<AccOf<X>>(src[c * KK + t]);
    }
  }
  return wt;
}

at::Tensor empty_cl(const at::Tensor& x, int64_t h, int64_t w) {
  return cpu::empty_output({x.size(0), x.size(1), h, w}, x.options(),
                           at::MemoryFormat::ChannelsLast);
}


// Work units are split into groups, each with its own partial sums, merged in group order
// (deterministic for any thread count: the count depends on the shapes only). About one
// group per kGroupElems values of work, rounded up to a multiple of kGroupMultiple (even
// shares for 1, 2, 4 and 8 threads) and at most kMaxGroups or one per unit. Small passes
// thus get few groups: the statistics' partials are merged on one thread, and with one
// group per row (up to 64) B0's 7x7 and 14x14 layers spent about as long zeroing and
// merging 1 + 2C doubles per group as in the pass itself.
constexpr int64_t kGroupElems = int64_t(1) << 15;
constexpr int64_t kGroupMultiple = 8;

int64_t group_count(int64_t units, int64_t elems_per_unit) {
  if (units <= 0) return 0;
  const int64_t wanted = (units * elems_per_unit + kGroupElems - 1) / kGroupElems;
  const int64_t rounded = (wanted + kGroupMultiple - 1) / kGroupMultiple * kGroupMultiple;
  return std::max<int64_t>(1, std::min({units, kMaxGroups, rounded}));
}

// Storage for the partial sums of `groups` groups of `width` doubles, left uninitialized:
// run_groups zeroes each group's partial on the thread that fills it.
std::unique_ptr<double[]> group_partials(int64_t groups, int64_t width) {
  return std::unique_ptr<double[]>(new double[std::max<int64_t>(1, groups * width)]);
}

// Runs body(GroupRange) once per thread, over that thread's share of the `groups`
// groups of `units` work units, after zeroing those groups' partials (part + i * width).
template <class F>
void run_groups(int64_t units, int64_t groups, double* part, int64_t width, F&& body) {
  at::parallel_for(0, groups, 1, [&](int64_t b, int64_t e) {
    std::fill(part + b * width, part + e * width, 0.0);
    body(GroupRange{units, groups, b, e});
  });
}

// total[j] = sum over groups i, in group order, of part[i * width + j] (the same order for
// any thread count), in parallel over ranges of j.
std::vector<double> sum_groups(const double* part, int64_t groups, int64_t width) {
  std::vector<double> total(width, 0.0);
  at::parallel_for(0, width, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < groups; ++i) {
      const double* pi = part + i * width;
      for (int64_t j = j0; j < j1; ++j) total[j] += pi[j];
    }
  });
  return total;
}

// Input-row blocks per image for the backward pass: enough units to balance threads,
// blocks of at least 8 rows to keep the recomputed halo small.
int64_t backward_blocks(const Geo& g) {
  if (g.N == 0) return 1;
  const int64_t want = (32 + g.N - 1) / g.N;
  return std::max<int64_t>(1, std::min(want, g.H / 8));
}

}  // namespace

// ---- primitives ---------------------------------------------------------------------

namespace {

// mean, var (and, with stash, y = the conv output in x's dtype, channels_last).
std::tuple<at::Tensor, at::Tensor, at::Tensor> stats_impl(const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          int64_t stride, int64_t pad_top,
                                                          int64_t pad_left, int64_t out_h,
                                                          int64_t out_w, bool stash) {
  check_input(x, weight, stride, pad_top, pad_left, 0);
  const Geo g = make_geo(x, weight, stride, pad_top, pad_left, out_h, out_w, 0);
  const auto xc = to_format(x, at::MemoryFormat::ChannelsLast);
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  at::Tensor mean = at::empty({g.C}, acc_opts), var = at::empty({g.C}, acc_opts);
  at::Tensor y;
  if (stash) {
    check_keepable(x, "dw_stats_stash keeps y");
    y = empty_cl(x, g.OH, g.OW);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_stats", [&] {
    using X = scalar_t;
    using A = AccOf<X>;
    const auto wt = transpose_weight<X>(weight);
    const Params<A> p{wt.data()};
    const int64_t width = 1 + 2 * g.C;
    const int64_t groups = group_count(g.N * g.OH, g.OW * g.C);
    const auto part = group_partials(groups, width);
    const auto kernel = cpu_dw::pick_stats_rows<X>();
    X* y_out = stash ? y.data_ptr<X>() : nullptr;
    run_groups(g.N * g.OH, groups, part.get(), width, [&](const GroupRange& range) {
      kernel(g, xc.const_data_ptr<X>(), p, range, part.get(), y_out);
    });
    std::vector<double> total(width, 0.0);
    for (int64_t i = 0; i < groups; ++i) {
      const double* pi = part.get() + i * width;
      chan_merge(total.data(), g.C, pi[0], pi + 1, pi + 1 + g.C);
    }
    A* m = mean.data_ptr<A>();
    A* v = var.data_ptr<A>();
    for (int64_t c = 0; c < g.C; ++c) {
      m[c] = total[0] > 0 ? A(total[1 + c]) : std::numeric_limits<A>::quiet_NaN();
      v[c] = total[0] > 0 ? A(total[1 + g.C + c] / total[0]) : std::numeric_limits<A>::quiet_NaN();
    }
  });
  return {mean, var, y};
}

// pooled[n][c] = sum over image n's rows of row_sums[n * OH + oh][c], in double, in row
// order (deterministic for any thread count).
template <typename A>
void image_sums(const Geo& g, const A* row_sums, A* pooled) {
  std::vector<double> image(g.C);
  for (int64_t n = 0; n < g.N; ++n) {
    std::fill(image.begin(), image.end(), 0.0);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const A* row = row_sums + (n * g.OH + oh) * g.C;
      for (int64_t c = 0; c < g.C; ++c) image[c] += double(row[c]);
    }
    for (int64_t c = 0; c < g.C; ++c) pooled[n * g.C + c] = A(image[c]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dw_stats(const at::Tensor& x, const at::Tensor& weight,
                                            int64_t stride, int64_t pad_top, int64_t pad_left,
                                            int64_t out_h, int64_t out_w) {
  auto [mean, var, y] = stats_impl(x, weight, stride, pad_top, pad_left, out_h, out_w, false);
  return {mean, var};
}

// Training forward in two passes without a second conv (float storage): the stats pass
// also writes y, which dw_affine_act_ then turns into act(y * scale + shift) in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_stats_stash(
    const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t pad_top,
    int64_t pad_left, int64_t out_h, int64_t out_w) {
  return stats_impl(x, weight, stride, pad_top, pad_left, out_h, out_w, true);
}

namespace {

// out = act(conv * scale + shift); with `pool`, also the (N, C) sums of the stored out
// over its pixels in the accumulation dtype (per-row sums from the kernel, then added
// over each image's rows in double, in row order: deterministic for any thread count).
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& scale, const at::Tensor& shift,
                                                int64_t stride, int64_t pad_top,
                                                int64_t pad_left, int64_t out_h, int64_t out_w,
                                                int64_t act, bool pool) {
  const auto fmt = check_input(x, weight, stride, pad_top, pad_left, act);
  const Geo g = make_geo(x, weight, stride, pad_top, pad_left, out_h, out_w, act);
  const auto sc = per_channel(scale, "scale", x), sh = per_channel(shift, "shift", x);
  // An NCHW x is read and out written in NCHW by the planar row kernels (no conversion).
  const bool planar = fmt == at::MemoryFormat::Contiguous && planar_enabled.load();
  const auto xc = planar ? x : to_format(x, at::MemoryFormat::ChannelsLast);
  at::Tensor out = cpu::empty_output({g.N, g.C, g.OH, g.OW}, x.options(),
                                     planar ? fmt : at::MemoryFormat::ChannelsLast);
  at::Tensor pooled;
  if (pool) pooled = at::zeros({g.N, g.C}, x.options().dtype(acc_type_of(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_forward", [&] {
    using X = scalar_t;
    using A = AccOf<X>;
    const auto wt = transpose_weight<X>(weight);
    const Params<A> p{wt.data(), sc.const_data_ptr<A>(), sh.const_data_ptr<A>()};
    const auto kernel =
        planar ? cpu_dw::pick_forward_rows_planar<X>() : cpu_dw::pick_forward_rows<X>();
    std::vector<A> row_sums(pool ? g.N * g.OH * g.C : 0);
    A* sums = pool ? row_sums.data() : nullptr;
    at::parallel_for(0, g.N * g.OH, 1, [&](int64_t r0, int64_t r1) {
      kernel(g, xc.const_data_ptr<X>(), p, out.data_ptr<X>(), r0, r1, sums);
    });
    if (pool) image_sums(g, sums, pooled.data_ptr<A>());
  });
  return {to_format(out, fmt), pooled};
}

// y = act(y * scale + shift) in place on the channels_last y of dw_stats_stash; with
// `pool`, also the (N, C) sums of the result (as forward_impl).
std::tuple<at::Tensor, at::Tensor> affine_act_impl(at::Tensor& y, const at::Tensor& scale,
                                                   const at::Tensor& shift, int64_t act,
                                                   bool pool) {
  EFFNET_CHECK_DEVICE(y, at::kCPU);
  EFFNET_CHECK_DIM(y, 4);
  TORCH_CHECK(y.is_contiguous(at::MemoryFormat::ChannelsLast),
              "y must be the channels_last tensor of dw_stats_stash");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "y must be float32 or float64, got ", y.scalar_type());
  check_act(act);
  const Geo g{y.size(0), y.size(1), y.size(2), y.size(3), y.size(2),       y.size(3),
              1,         1,         0,         0,         act, prefetch_pixels(y, y.size(1))};
  const auto sc = per_channel(scale, "scale", y), sh = per_channel(shift, "shift", y);
  at::Tensor pooled;
  if (pool) pooled = at::zeros({g.N, g.C}, y.options().dtype(acc_type_of(y.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "dw_affine_act_", [&] {
    using X = scalar_t;
    using A = AccOf<X>;
    const Params<A> p{nullptr, sc.const_data_ptr<A>(), sh.const_data_ptr<A>()};
    const auto kernel = cpu_dw::pick_affine_act_rows<X>();
    std::vector<A> row_sums(pool ? g.N * g.OH * g.C : 0);
    A* sums = pool ? row_sums.data() : nullptr;
    at::parallel_for(0, g.N * g.OH, 1, [&](int64_t r0, int64_t r1) {
      kernel(g, y.data_ptr<X>(), p, r0, r1, sums);
    });
    if (pool) image_sums(g, sums, pooled.data_ptr<A>());
  });
  return {y, pooled};
}

}  // namespace

at::Tensor dw_affine_act_(at::Tensor y, const at::Tensor& scale, const at::Tensor& shift,
                          int64_t act) {
  return std::get<0>(affine_act_impl(y, scale, shift, act, false));
}

std::tuple<at::Tensor, at::Tensor> dw_affine_act_pool_(at::Tensor y, const at::Tensor& scale,
                                                       const at::Tensor& shift, int64_t act) {
  return affine_act_impl(y, scale, shift, act, true);
}

at::Tensor dw_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const at::Tensor& shift, int64_t stride, int64_t pad_top, int64_t pad_left,
                      int64_t out_h, int64_t out_w, int64_t act) {
  return std::get<0>(forward_impl(x, weight, scale, shift, stride, pad_top, pad_left, out_h,
                                  out_w, act, false));
}

std::tuple<at::Tensor, at::Tensor> dw_forward_pool(const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& shift, int64_t stride,
                                                   int64_t pad_top, int64_t pad_left,
                                                   int64_t out_h, int64_t out_w, int64_t act) {
  return forward_impl(x, weight, scale, shift, stride, pad_top, pad_left, out_h, out_w, act,
                      true);
}

// The eval plan's expand conv + depthwise conv in one pass (float32, channels_last): the
// depthwise input act_e(x expand_weight^T + expand_bias) is computed row by row into a
// per-thread cache of K rows (ExpandedRows, depthwise_kernels.h) and never stored. With
// `pool`, also the (N, C) sums of out (as dw_forward_pool). `packed`: the expand weight
// packed once (packed_weight.h), else packed here.
std::tuple<at::Tensor, at::Tensor> dw_expand_forward(
    const at::Tensor& x, const at::Tensor& expand_weight, const at::Tensor& expand_bias,
    int64_t expand_act, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, int64_t stride, int64_t pad_top, int64_t pad_left, int64_t out_h,
    int64_t out_w, int64_t act, bool pool, const cpu::PackedWeightPtr& packed) {
  TORCH_CHECK(cpu::gemm_available(), "dw_expand_forward: no float32 GEMM (no sgemm_ in libtorch_cpu, no AVX2)");
  EFFNET_CHECK_CPU_FLOAT_NHWC(x);
  EFFNET_CHECK_DEVICE(expand_weight, at::kCPU);
  EFFNET_CHECK_DTYPE(expand_weight, at::kFloat);
  EFFNET_CHECK_DIM(expand_weight, 4);
  const int64_t cin = x.size(1), C = expand_weight.size(0);
  TORCH_CHECK(expand_weight.size(1) == cin && expand_weight.size(2) == 1 &&
                  expand_weight.size(3) == 1,
              "expand_weight must be (C, ", cin, ", 1, 1), got shape ", expand_weight.sizes());
  EFFNET_CHECK_DEVICE(expand_bias, at::kCPU);
  EFFNET_CHECK_DTYPE(expand_bias, at::kFloat);
  TORCH_CHECK(expand_bias.dim() == 1 && expand_bias.size(0) == C,
              "expand_bias must have shape (", C, ",), got ", expand_bias.sizes());
  check_act(expand_act);
  // The depthwise part is checked as dw_forward checks it, against `expanded`: a
  // zero-stride stand-in (one element of storage) with the expanded activation's shape,
  // dtype and device, which make_geo, per_channel and empty_cl read.
  const auto expanded = at::empty({1}, x.options()).as_strided(
      {x.size(0), C, x.size(2), x.size(3)}, {0, 0, 0, 0});
  check_weight_and_geometry(weight, C, at::kFloat, stride, pad_top, pad_left, act);
  const auto sc = per_channel(scale, "scale", expanded), sh = per_channel(shift, "shift", expanded);
  Geo g = make_geo(expanded, weight, stride, pad_top, pad_left, out_h, out_w, act);
  g.pf = 0;  // the input rows are in the row cache; only out streams through memory
  const auto xc = to_format(x, at::MemoryFormat::ChannelsLast);
  const auto w2d = expand_weight.reshape({C, cin}).contiguous();
  const auto bias = expand_bias.contiguous();
  at::Tensor out = empty_cl(expanded, g.OH, g.OW);
  at::Tensor pooled;
  if (pool) pooled = at::zeros({g.N, g.C}, x.options());
  const auto wt = transpose_weight<float>(weight);
  const Params<float> p{wt.data(), sc.const_data_ptr<float>(), sh.const_data_ptr<float>()};
  const cpu::XWtProduct* prepacked = packed ? packed->product_for(expand_weight) : nullptr;
  cpu::XWtProduct own;
  if (!prepacked) own.reset(w2d.const_data_ptr<float>(), C, cin);
  const ExpandSource e{xc.const_data_ptr<float>(), prepacked ? prepacked : &own, bias.const_data_ptr<float>(), cin,
                       expand_act,
                       EFFNET_PICK_ISA(cpu_pw, bias_act_rows)};
  const auto kernel = EFFNET_PICK_ISA(cpu_dw, expand_forward_rows);
  std::vector<float> row_sums(pool ? g.N * g.OH * g.C : 0);
  float* sums = pool ? row_sums.data() : nullptr;
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t r0, int64_t r1) {
    kernel(g, e, p, out.data_ptr<float>(), r0, r1, sums);
  });
  if (pool) image_sums(g, sums, pooled.data_ptr<float>());
  return {out, pooled};
}

namespace {

// sum_g, sum_g_yc (and, with stash, g = dy * act'(z) in x's dtype, channels_last, and
// with keep_y also y = the conv output).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> reduce_impl(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, int64_t stride, int64_t pad_top,
    int64_t pad_left, int64_t act, bool stash, bool keep_y) {
  check_input(x, weight, stride, pad_top, pad_left, act);
  const auto dyc = grad_output(dy, x);
  const Geo g = make_geo(x, weight, stride, pad_top, pad_left, dy.size(2), dy.size(3), act);
  const auto sc = per_channel(scale, "scale", x), sh = per_channel(shift, "shift", x);
  const auto mu = per_channel(mean, "mean", x);
  const auto xc = to_format(x, at::MemoryFormat::ChannelsLast);
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  at::Tensor sum_g = at::empty({g.C}, acc_opts), sum_g_yc = at::empty({g.C}, acc_opts);
  at::Tensor grad;
  std::optional<at::Tensor> y;
  if (stash) {
    check_keepable(x, "dw_backward_reduce_stash keeps g");
    grad = empty_cl(x, g.OH, g.OW);
    if (keep_y) y = empty_cl(x, g.OH, g.OW);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_backward_reduce", [&] {
    using X = scalar_t;
    using A = AccOf<X>;
    const auto wt = transpose_weight<X>(weight);
    const Params<A> p{wt.data(), sc.const_data_ptr<A>(), sh.const_data_ptr<A>(), mu.const_data_ptr<A>()};
    const int64_t groups = group_count(g.N * g.OH, g.OW * g.C);
    const auto part = group_partials(groups, 2 * g.C);
    const auto kernel = cpu_dw::pick_reduce_rows<X>();
    X* g_out = stash ? grad.data_ptr<X>() : nullptr;
    X* y_out = y ? y->data_ptr<X>() : nullptr;
    run_groups(g.N * g.OH, groups, part.get(), 2 * g.C, [&](const GroupRange& range) {
      kernel(g, xc.const_data_ptr<X>(), dyc.const_data_ptr<X>(), p, range, part.get(), g_out,
             y_out);
    });
    A* s1 = sum_g.data_ptr<A>();
    A* s2 = sum_g_yc.data_ptr<A>();
    const auto total = sum_groups(part.get(), groups, 2 * g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      s1[c] = A(total[c]);
      s2[c] = A(total[g.C + c]);
    }
  });
  return {sum_g, sum_g_yc, grad, y};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dw_backward_reduce(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, int64_t stride, int64_t pad_top,
    int64_t pad_left, int64_t act) {
  auto [sum_g, sum_g_yc, grad, y] = reduce_impl(dy, x, weight, scale, shift, mean, stride,
                                                pad_top, pad_left, act, false, false);
  return {sum_g, sum_g_yc};
}

// dw_backward_reduce that also returns g = dy * act'(z) (float storage): dw_backward(g, ...,
// act = identity) then skips the activation derivative, the costliest part of its sweep;
// with keep_y also y, so that dw_backward(..., y=y) skips its conv too (None otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>>
dw_backward_reduce_stash(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& scale, const at::Tensor& shift,
                         const at::Tensor& mean, int64_t stride, int64_t pad_top,
                         int64_t pad_left, int64_t act, bool keep_y) {
  return reduce_impl(dy, x, weight, scale, shift, mean, stride, pad_top, pad_left, act, true,
                     keep_y);
}

std::tuple<at::Tensor, at::Tensor> dw_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& coef_b,
    const at::Tensor& coef_c, int64_t stride, int64_t pad_top, int64_t pad_left, int64_t act,
    const std::optional<at::Tensor>& y) {
  const auto fmt = check_input(x, weight, stride, pad_top, pad_left, act);
  const auto dyc = grad_output(dy, x);
  const Geo g = make_geo(x, weight, stride, pad_top, pad_left, dy.size(2), dy.size(3), act);
  if (y) {
    check_keepable(x, "dw_backward reads a kept y");
    TORCH_CHECK(y->sizes() == dyc.sizes() && y->scalar_type() == x.scalar_type() &&
                    y->device().is_cpu() && y->is_contiguous(at::MemoryFormat::ChannelsLast),
                "y must be the channels_last ", x.scalar_type(), " tensor of shape ",
                dyc.sizes(), " that dw_backward_reduce_stash kept, got ", y->scalar_type(),
                " of shape ", y->sizes());
  }
  const auto sc = per_channel(scale, "scale", x), sh = per_channel(shift, "shift", x);
  const auto mu = per_channel(mean, "mean", x);
  const auto cb = per_channel(coef_b, "coef_b", x), cc = per_channel(coef_c, "coef_c", x);
  const auto xc = to_format(x, at::MemoryFormat::ChannelsLast);
  at::Tensor dx = empty_cl(x, g.H, g.W);
  at::Tensor dweight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_backward", [&] {
    using X = scalar_t;
    using A = AccOf<X>;
    const auto wt = transpose_weight<X>(weight);
    const Params<A> p{wt.data(), sc.const_data_ptr<A>(), sh.const_data_ptr<A>(),
                      mu.const_data_ptr<A>(), cb.const_data_ptr<A>(), cc.const_data_ptr<A>()};
    const int64_t width = g.K * g.K * g.C, blocks = backward_blocks(g);
    const int64_t groups = group_count(g.N * blocks, g.H / blocks * g.W * g.C);
    const auto part = group_partials(groups, width);
    const auto kernel = cpu_dw::pick_backward_units<X>();
    run_groups(g.N * blocks, groups, part.get(), width, [&](const GroupRange& range) {
      kernel(g, xc.const_data_ptr<X>(), dyc.const_data_ptr<X>(),
             y ? y->const_data_ptr<X>() : nullptr, p, dx.data_ptr<X>(), blocks, range,
             part.get());
    });
    const auto total = sum_groups(part.get(), groups, width);
    X* dw = dweight.data_ptr<X>();
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t t = 0; t < g.K * g.K; ++t) dw[c * g.K * g.K + t] = static_cast<X>(total[t * g.C + c]);
    }
  });
  return {to_format(dx, fmt), dweight};
}

}  // namespace effnet::cpu_dw

EFFNET_BINDINGS(bind_cpu_depthwise) {
  namespace py = pybind11;
  using namespace effnet::cpu_dw;
  auto cpu = m.def_submodule("cpu");
  cpu.def("dw_stats", &dw_stats, "per-channel mean and biased var of depthwise_conv(x, weight)",
          py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("pad_top"),
          py::arg("pad_left"), py::arg("out_h"), py::arg("out_w"));
  cpu.def("dw_stats_stash", &dw_stats_stash,
          "(mean, var, y): dw_stats that also keeps y = depthwise_conv(x, weight) (float32/64)",
          py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("pad_top"),
          py::arg("pad_left"), py::arg("out_h"), py::arg("out_w"));
  cpu.def("dw_affine_act_", &dw_affine_act_,
          "y = act(y * scale + shift) in place on the y of dw_stats_stash", py::arg("y"),
          py::arg("scale"), py::arg("shift"), py::arg("act"));
  cpu.def("dw_affine_act_pool_", &dw_affine_act_pool_,
          "(y, pooled): dw_affine_act_ and the (N, C) sums of the result over its pixels",
          py::arg("y"), py::arg("scale"), py::arg("shift"), py::arg("act"));
  cpu.def("dw_forward", &dw_forward, "act(depthwise_conv(x, weight) * scale + shift)",
          py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"), py::arg("stride"),
          py::arg("pad_top"), py::arg("pad_left"), py::arg("out_h"), py::arg("out_w"),
          py::arg("act"));
  cpu.def("dw_forward_pool", &dw_forward_pool,
          "(out, pooled): dw_forward and the (N, C) sums of out over its pixels",
          py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"), py::arg("stride"),
          py::arg("pad_top"), py::arg("pad_left"), py::arg("out_h"), py::arg("out_w"),
          py::arg("act"));
  cpu.def("dw_expand_forward", &dw_expand_forward,
          "(out, pooled or None): dw_forward on act_e(conv1x1(x, expand_weight) + expand_bias), "
          "the expanded input computed per row, never stored (float32, channels_last x)",
          py::arg("x"), py::arg("expand_weight"), py::arg("expand_bias"), py::arg("expand_act"),
          py::arg("weight"), py::arg("scale"), py::arg("shift"), py::arg("stride"),
          py::arg("pad_top"), py::arg("pad_left"), py::arg("out_h"), py::arg("out_w"),
          py::arg("act"), py::arg("pool"), py::arg("packed") = py::none());
  cpu.def("dw_backward_reduce", &dw_backward_reduce, "per-channel sums of g and g * (y - mean)",
          py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"),
          py::arg("mean"), py::arg("stride"), py::arg("pad_top"), py::arg("pad_left"),
          py::arg("act"));
  cpu.def("dw_backward_reduce_stash", &dw_backward_reduce_stash,
          "(sum_g, sum_g_yc, g, y): dw_backward_reduce that also keeps g = dy * act'(z) "
          "and, with keep_y, y = depthwise_conv(x, weight) (None without; float32/64)",
          py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"),
          py::arg("mean"), py::arg("stride"), py::arg("pad_top"), py::arg("pad_left"),
          py::arg("act"), py::arg("keep_y") = false);
  cpu.def("dw_backward", &dw_backward, "(dx, dweight) of the fused depthwise op", py::arg("dy"),
          py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"), py::arg("mean"),
          py::arg("coef_b"), py::arg("coef_c"), py::arg("stride"), py::arg("pad_top"),
          py::arg("pad_left"), py::arg("act"), py::arg("y") = py::none());
  cpu.def("dw_set_prefetch", &effnet::cpu_dw::dw_set_prefetch,
          "turn the depthwise row kernels' software prefetch on or off; returns the previous "
          "setting (the results do not depend on it)",
          py::arg("enabled"));
  cpu.def("dw_set_planar", &effnet::cpu_dw::dw_set_planar,
          "turn the NCHW (planar) route of dw_forward / dw_forward_pool on or off (it is on by "
          "default; off converts NCHW tensors to channels_last and back); returns the previous "
          "setting",
          py::arg("enabled"));
  cpu.def("dw_simd_isa", []() { return std::string(effnet::cpu::isa_name()); },
          "instruction set the depthwise kernels dispatched to (avx512, avx2, base)");
}
