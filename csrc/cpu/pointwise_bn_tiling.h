// Shared pieces of the tiled CPU training 1x1 conv + BatchNorm kernels
// (pointwise_bn_train.cpp, pointwise_bn_gram.cpp): the row tiling, the argument checks, the
// order-fixed merges of per-tile sums and per-group weight-gradient partials, and the
// pass both backward routes end with (dL/dy per tile, then its dx and dW GEMMs).
//
// Layout: x (N, Cin, H, W) and the conv's (N, Cout, H, W) tensors are channels_last, so
// their P = N*H*W pixels are the rows of row-major (P, Cin) / (P, Cout) matrices; the
// weight is (Cout, Cin) row-major.
//
// Work split: tiles of T rows (about kTileFloats outputs, at least Cin rows so re-reading
// W per tile costs no more than the tile's output), each a single-threaded GEMM; tiles
// run in parallel, in at most kGroups groups of consecutive tiles (fewer in the backward
// where Cout * Cin is large: each group keeps its own dW partial, at most
// kDwPartialFloats in all). Per-channel sums are kept per tile and merged in tile order
// in double, dW partials summed in group order: results depend on the shapes only, not
// on the thread count. Where dL/dy is small (few pixels, B0's 14x14 and 7x7 stages) the
// backward keeps it whole instead and takes dW = dy^T x in one pass over all rows, split
// by output channels: no partials to write and sum, and GEMMs with all rows as their
// reduction instead of one tile's.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "output_cache.h"
#include "packed_gemm.h"
#include "sgemm.h"

namespace effnet::cpu_pw {

inline constexpr int64_t kTileFloats = int64_t(1) << 16;
inline constexpr int64_t kGroups = 16;
inline constexpr int64_t kMinTiles = 8;  // smaller problems still split over 8 threads
inline constexpr int64_t kDwPartialFloats = int64_t(1) << 21;
// dL/dy matrices of at most this many floats are kept whole for the weight gradient.
inline constexpr int64_t kKeptDyFloats = int64_t(1) << 21;

// Whether the backward keeps small dL/dy matrices whole (pw_set_kept_dy; on by default).
bool kept_dy_enabled();

struct Tiling {
  int64_t rows, tile, tiles, groups;
  int64_t begin(int64_t t) const { return t * tile; }
  int64_t count(int64_t t) const { return std::min(tile, rows - t * tile); }
  int64_t first_tile(int64_t g) const { return tiles * g / groups; }
};

inline Tiling make_tiling(int64_t rows, int64_t cin, int64_t cout, int64_t max_groups = kGroups) {
  int64_t tile = std::max({kTileFloats / cout, cin, int64_t(16)});
  tile = std::min(tile, std::max<int64_t>(1, (rows + kMinTiles - 1) / kMinTiles));
  const int64_t tiles = (rows + tile - 1) / tile;
  return {rows, tile, tiles, std::min(tiles, max_groups)};
}

// body(group, tile, scratch) for every tile, in parallel over the groups of consecutive
// tiles; scratch holds `scratch_floats` floats per thread.
template <class F>
inline void for_tiles(const Tiling& tl, int64_t scratch_floats, F&& body) {
  at::parallel_for(0, tl.groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t t = tl.first_tile(g); t < tl.first_tile(g + 1); ++t) body(g, t, scratch.data());
    }
  });
}

struct Args {
  int64_t rows, cin, cout;
  const float* x;
  const float* w;
  cpu::XWtProduct xwt;         // rows of x -> rows of y = x w^T (packed_gemm.h)
  cpu::XWtProduct dx_product;  // rows of dL/dy -> rows of dx = dL/dy w (check_backward)
};

// The checked (x, weight) pair; with pack_xwt, xwt ready for y = x w^T.
inline Args check_x_w(const at::Tensor& x, const at::Tensor& weight, bool pack_xwt = true) {
  TORCH_CHECK(cpu::sgemm_available(), "pointwise BN kernels: libtorch_cpu exports no sgemm_");
  EFFNET_CHECK_CPU_FLOAT_NHWC(x);
  EFFNET_CHECK_DEVICE(weight, at::kCPU);
  EFFNET_CHECK_DTYPE(weight, at::kFloat);
  EFFNET_CHECK_DIM(weight, 2);
  EFFNET_CHECK_CONTIGUOUS(weight);
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must be (Cout, ", x.size(1),
              "), got shape ", weight.sizes());
  TORCH_CHECK(x.numel() > 0 && weight.size(0) > 0, "x and weight must be non-empty");
  Args a{x.numel() / x.size(1), x.size(1), weight.size(0), x.const_data_ptr<float>(),
         weight.const_data_ptr<float>(), {}, {}};
  if (pack_xwt) a.xwt.reset(a.w, a.cout, a.cin);
  return a;
}

inline void check_like_out(const at::Tensor& t, const char* name, const at::Tensor& x,
                           int64_t cout) {
  EFFNET_CHECK_DTYPE(t, at::kFloat);
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.size(0) == x.size(0) &&
                  t.size(1) == cout && t.size(2) == x.size(2) && t.size(3) == x.size(3),
              name, " must be a cpu (", x.size(0), ", ", cout, ", ", x.size(2), ", ",
              x.size(3), ") tensor, got ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              " must be contiguous in channels_last format");
}

inline const float* channel_vector(const at::Tensor& t, const char* name, int64_t cout) {
  EFFNET_CHECK_DTYPE(t, at::kFloat);
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.numel() == cout && t.is_contiguous(),
              name, " must be a contiguous cpu (", cout, ") vector, got ", t.sizes());
  return t.const_data_ptr<float>();
}

inline at::Tensor empty_like_out(const at::Tensor& x, int64_t channels) {
  return cpu::empty_output({x.size(0), channels, x.size(2), x.size(3)}, x.options(),
                           at::MemoryFormat::ChannelsLast);
}

// (sum_g, sum_g_yc) as float (C) tensors from per-tile partials part[t][2][C] (float),
// summed in tile order in double.
inline std::tuple<at::Tensor, at::Tensor> merge_tile_sums(const std::vector<float>& part,
                                                          int64_t tiles, int64_t C,
                                                          const at::TensorOptions& options) {
  std::vector<double> total(2 * C, 0.0);
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t i = 0; i < 2 * C; ++i) total[i] += double(part[t * 2 * C + i]);
  }
  at::Tensor sum_g = at::empty({C}, options), sum_g_yc = at::empty({C}, options);
  float* s1 = sum_g.mutable_data_ptr<float>();
  float* s2 = sum_g_yc.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    s1[c] = float(total[c]);
    s2[c] = float(total[C + c]);
  }
  return {sum_g, sum_g_yc};
}

// The (Cout, Cin) weight gradient from `groups` partials of `size` = Cout * Cin floats
// each, summed in group order.
inline at::Tensor sum_dw_partials(const float* dw_part, int64_t groups, int64_t cout,
                                  int64_t cin, const at::TensorOptions& options) {
  at::Tensor dweight = at::empty({cout, cin}, options);
  float* out = dweight.mutable_data_ptr<float>();
  const int64_t size = cout * cin;
  at::parallel_for(0, size, 4096, [&](int64_t i0, int64_t i1) {
    std::copy(dw_part + i0, dw_part + i1, out + i0);
    for (int64_t g = 1; g < groups; ++g) {
      const float* p = dw_part + g * size;
      for (int64_t i = i0; i < i1; ++i) out[i] += p[i];
    }
  });
  return dweight;
}

// The tiling of the backward's gradient pass: fewer groups where Cout * Cin is large, each
// group keeping its own dW partial (at most kDwPartialFloats in all).
inline Tiling backward_tiling(const Args& a) {
  return make_tiling(a.rows, a.cin, a.cout,
                     std::max<int64_t>(2, kDwPartialFloats / (a.cout * a.cin)));
}

// Whether tiled_input_grads keeps dL/dy whole: it is small, and the groups' partials
// (written, then read to be summed) are at least half as large as x, which the whole-dy
// route reads once more (measured on B0-B4's 1x1 convs at batches 8-32: faster by up to
// x1.28 where this holds, up to 6 % slower on narrowing convs at 14x14 and 28x28 where
// it does not).
inline bool keeps_dy(const Args& a, const Tiling& tl) {
  return kept_dy_enabled() && tl.groups > 1 && a.rows * a.cout <= kKeptDyFloats &&
         2 * tl.groups * a.cout >= a.rows;
}

// dw (cout, cin) = dy^T x over all rows of a whole (rows, cout) dy, in parallel over
// blocks of output channels, each a multiple of the micro tile's 12 (or 6) rows. On the
// native GEMM each element is one FMA chain over the rows in order whatever block holds
// it, so the blocks are one per thread (an equal share each: finer fixed blocks measured
// 5-10 % slower, each re-reading x). A BLAS product's sums may depend on its call's
// shape, so there the blocks (at most 32) depend on the shape only, not the thread count.
inline void dw_from_whole_dy(const Args& a, const float* dy, float* dw) {
  constexpr int64_t unit = 12, max_blocks = 32;
  const int64_t units = (a.cout + unit - 1) / unit;
  const int64_t parts = cpu::native_gemm() ? std::max<int64_t>(1, at::get_num_threads())
                                           : max_blocks;
  const int64_t block = (units + parts - 1) / parts * unit;
  const int64_t blocks = (a.cout + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = b * block, o1 = std::min(a.cout, o0 + block);
      cpu::dtx_product(dy + o0, a.cout, a.x, dw + o0 * a.cin, a.rows, a.cin, o1 - o0, false);
    }
  });
}

// (dx, dW) of the conv from dL/dy tile by tile: tile_dy(t, scratch) returns the tile's
// rows of dL/dy, (count(t), Cout) row-major (written into scratch, `scratch_floats` floats
// per thread, or already in memory); then dx's rows = dy W and the group's dW partial +=
// dy^T x, or (keeps_dy) the tiles of dy go into one whole dy, from which dW is taken at
// the end. tile_dy runs for every tile even where neither gradient is needed (callers may
// gather sums in it); with a whole dy, scratch is the tile's rows of it.
template <class TileDy>
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> tiled_input_grads(
    const Args& a, const Tiling& tl, const at::Tensor& x, bool need_dx, bool need_dweight,
    int64_t scratch_floats, TileDy&& tile_dy) {
  std::optional<at::Tensor> dx, dweight;
  float* dxp = nullptr;
  if (need_dx) {
    dx = empty_like_out(x, a.cin);
    dxp = dx->mutable_data_ptr<float>();
  }
  if (need_dweight && keeps_dy(a, tl)) {
    at::Tensor whole = cpu::empty_output({a.rows, a.cout}, x.options());  // reused memory
    float* dy_all = whole.mutable_data_ptr<float>();
    for_tiles(tl, 0, [&](int64_t, int64_t t, float*) {
      const int64_t r0 = tl.begin(t), rows = tl.count(t);
      float* rows_of_dy = dy_all + r0 * a.cout;
      const float* dy = tile_dy(t, rows_of_dy);
      if (dy != rows_of_dy) std::copy(dy, dy + rows * a.cout, rows_of_dy);
      if (need_dx) a.dx_product(rows_of_dy, dxp + r0 * a.cin, rows);
    });
    dweight = at::empty({a.cout, a.cin}, x.options());
    dw_from_whole_dy(a, dy_all, dweight->mutable_data_ptr<float>());
    return {dx, dweight};
  }
  // Each group's first tile writes its dW partial, later tiles add to it: no zeroing of
  // groups * Cout * Cin floats on one thread first (up to 8 MB on B0's 14x14 expands).
  std::unique_ptr<float[]> dw_part(need_dweight ? new float[tl.groups * a.cout * a.cin] : nullptr);
  for_tiles(tl, scratch_floats, [&](int64_t g, int64_t t, float* scratch) {
    const int64_t r0 = tl.begin(t), rows = tl.count(t);
    const float* dy = tile_dy(t, scratch);
    if (need_dx) a.dx_product(dy, dxp + r0 * a.cin, rows);
    if (need_dweight) {
      cpu::dtx_product(dy, a.cout, a.x + r0 * a.cin, dw_part.get() + g * a.cout * a.cin, rows,
                       a.cin, a.cout, t != tl.first_tile(g));
    }
  });
  if (need_dweight) {  // check_x_w refuses empty x: every group has at least one tile
    dweight = sum_dw_partials(dw_part.get(), tl.groups, a.cout, a.cin, x.options());
  }
  return {dx, dweight};
}

inline const float* kept_y(const std::optional<at::Tensor>& y, const at::Tensor& x, int64_t cout) {
  if (!y.has_value()) return nullptr;
  check_like_out(*y, "y", x, cout);
  return y->const_data_ptr<float>();
}

// The inputs both backward primitives take, checked.
struct BackwardInputs {
  Args a;
  const float* dout;
  const float* y_kept;  // nullptr: recompute y per tile
  const float* scale;
  const float* shift;
  const float* mean;
};

inline BackwardInputs check_backward(const at::Tensor& dout, const at::Tensor& x,
                              const at::Tensor& weight, const std::optional<at::Tensor>& y,
                              const at::Tensor& scale, const at::Tensor& shift,
                              const at::Tensor& mean, int64_t act) {
  Args a = check_x_w(x, weight, !y.has_value());  // y = x w^T only to recompute y
  check_act(act);
  check_like_out(dout, "dout", x, a.cout);
  a.dx_product.reset_xw(a.w, a.cout, a.cin);
  const float* y_kept = kept_y(y, x, a.cout);
  const int64_t cout = a.cout;
  return {std::move(a), dout.const_data_ptr<float>(), y_kept,
          channel_vector(scale, "scale", cout), channel_vector(shift, "shift", cout),
          channel_vector(mean, "mean", cout)};
}

}  // namespace effnet::cpu_pw
