// NCHW <-> channels_last copies of CPU tensors as tiled transposes.
//
// Per image, NCHW is a (C, H*W) row-major matrix and channels_last an (H*W, C) one, so a
// layout change is a batch of 2-D transposes: dst[j * rows + i] = src[i * cols + j].
// at::Tensor::copy_ walks such a copy element by element with one side strided across
// the whole image: 9.5 ms for a channels_last -> NCHW copy of 8 x 96 x 112 x 112 floats
// against 1.6 ms for a plain copy (2-core Xeon VM). Here each task transposes a
// kTile x kTile block (4 KiB of floats, in L1). Elements are moved as raw bytes of their
// size (2, 4 or 8), so every dtype of those sizes takes the same code; 4-byte ones go
// through the depthwise kernels' vectorized 8 x 8 tile transpose (transpose_floats, per
// ISA), the others element by element. Tasks are (image, row block, column block).
#include "layout_copy.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "common/binding_registry.h"
#include "depthwise_passes.h"
#include "isa.h"

namespace effnet::cpu {
namespace {

constexpr int64_t kTile = 32;
constexpr int64_t kTilesPerTask = 16;

template <typename T>
void transpose_batched(const T* src, T* dst, int64_t batch, int64_t rows, int64_t cols) {
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  const int64_t col_tiles = (cols + kTile - 1) / kTile;
  const int64_t tiles_per_image = row_tiles * col_tiles;
  at::parallel_for(0, batch * tiles_per_image, kTilesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles_per_image, in_image = t % tiles_per_image;
      const int64_t r0 = (in_image / col_tiles) * kTile, c0 = (in_image % col_tiles) * kTile;
      const int64_t r1 = std::min(r0 + kTile, rows), c1 = std::min(c0 + kTile, cols);
      const T* s = src + b * rows * cols;
      T* d = dst + b * rows * cols;
      if constexpr (sizeof(T) == 4) {  // the depthwise kernels' vectorized 8 x 8 tiles
        static const auto transpose = EFFNET_PICK_ISA(::effnet::cpu_dw, transpose_floats);
        transpose(reinterpret_cast<const float*>(s + r0 * cols + c0), cols,
                  reinterpret_cast<float*>(d + c0 * rows + r0), rows, r1 - r0, c1 - c0);
        continue;
      }
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) d[c * rows + r] = s[r * cols + c];
      }
    }
  });
}

template <typename T>
void transpose_as(const at::Tensor& src, at::Tensor& dst, int64_t rows, int64_t cols) {
  transpose_batched(static_cast<const T*>(src.data_ptr()), static_cast<T*>(dst.data_ptr()),
                    src.size(0), rows, cols);
}

// Dense in `fmt` and not also dense in the other format (C == 1 or H * W == 1), where the
// two layouts are the same bytes and a plain copy is right.
bool only_in(const at::Tensor& t, at::MemoryFormat fmt) {
  const auto other = fmt == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::Contiguous
                                                           : at::MemoryFormat::ChannelsLast;
  return t.is_contiguous(fmt) && !t.is_contiguous(other);
}

}  // namespace

void copy_layout(at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.sizes() == src.sizes(), "copy_layout: dst must have src's shape ", src.sizes(),
              ", got ", dst.sizes());
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "copy_layout: dst must have src's dtype ",
              src.scalar_type(), ", got ", dst.scalar_type());
  const bool transposable = src.device().is_cpu() && dst.device().is_cpu() && src.dim() == 4 &&
                            src.numel() > 0 && !src.is_conj() && !src.is_neg() &&
                            (src.element_size() == 2 || src.element_size() == 4 ||
                             src.element_size() == 8);
  const bool to_cl = transposable && only_in(src, at::MemoryFormat::Contiguous) &&
                     only_in(dst, at::MemoryFormat::ChannelsLast);
  const bool to_nchw = transposable && only_in(src, at::MemoryFormat::ChannelsLast) &&
                       only_in(dst, at::MemoryFormat::Contiguous);
  if (!to_cl && !to_nchw) {
    dst.copy_(src);
    return;
  }
  at::assert_no_overlap(dst, src);
  const int64_t channels = src.size(1), pixels = src.size(2) * src.size(3);
  const int64_t rows = to_cl ? channels : pixels, cols = to_cl ? pixels : channels;
  switch (src.element_size()) {
    case 2: transpose_as<uint16_t>(src, dst, rows, cols); break;
    case 4: transpose_as<uint32_t>(src, dst, rows, cols); break;
    default: transpose_as<uint64_t>(src, dst, rows, cols); break;
  }
}

}  // namespace effnet::cpu

EFFNET_BINDINGS(bind_layout_copy) {
  auto cpu = m.def_submodule("cpu");
  cpu.def(
      "copy_layout",
      [](at::Tensor dst, const at::Tensor& src) {
        effnet::cpu::copy_layout(dst, src);
        return dst;
      },
      "dst.copy_(src); a dense NCHW <-> channels_last copy as a tiled transpose",
      pybind11::arg("dst"), pybind11::arg("src"));
}
