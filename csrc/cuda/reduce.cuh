// Deterministic per-channel reductions over the pixel lanes of a block, and the second-pass
// kernels that merge per-chunk partials.
//
// A block is (cx, lanes) threads, cx a power of two <= 32 (see depthwise_tile.cuh). All
// threads with the same threadIdx.x (the same channels) form one column; a reduction
// combines the values of a column over its lanes:
//   1. inside a warp, lanes of a column sit at lane ids tx, tx + cx, tx + 2cx, ...: an xor
//      butterfly with offsets 16, 8, ..., cx combines them (all 32 threads take part);
//   2. the first row of each warp (lane id < cx, so lane id == tx) writes its value to
//      shared memory s[(warp * NV + k) * 32 + tx]; thread row 0 (tid < cx) then combines
//      the NW = NT / 32 warp values in warp order.
// The result is valid in threads with threadIdx.y == 0. The order of operations depends
// only on the launch shape, so results are bitwise reproducible run to run.
//
// Batch statistics: each chunk q of n_q pixels leaves (shift_q, s1_q, s2_q) = (about the
// chunk's mean, sum (y - shift_q), sum (y - shift_q)^2) in double; its mean is
// shift_q + s1_q / n_q and its M2 is s2_q - s1_q^2 / n_q, and the chunks are combined with
// Chan's parallel merge
//   n = na + nb,  d = mb - ma,  mean = ma + d * nb / n,  M2 = M2a + M2b + d^2 * na * nb / n
// in double, one thread per channel, in chunk order; var = M2 / n.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace effnet {
namespace cuda {

// Column sums of NV values of type F (float or double) over the lanes of an NT-thread
// block (result in row 0). smem: NT / 32 * NV * 32 values of F.
template <int NT, int NV, typename F = float>
__device__ __forceinline__ void lane_sum(F (&val)[NV], F* smem) {
  const int cx = blockDim.x;
  const int tid = threadIdx.y * cx + threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int o = 16; o >= cx; o >>= 1) {
#pragma unroll
    for (int k = 0; k < NV; ++k) val[k] += __shfl_xor_sync(0xffffffffu, val[k], o);
  }
  __syncthreads();  // smem may have been read by an earlier reduction
  if (lane < cx) {
#pragma unroll
    for (int k = 0; k < NV; ++k) smem[(warp * NV + k) * 32 + lane] = val[k];
  }
  __syncthreads();
  if (tid < cx) {  // threadIdx.y == 0, warp 0, lane == tx
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      F s = smem[k * 32 + tid];
      for (int w = 1; w < NT / 32; ++w) s += smem[(w * NV + k) * 32 + tid];
      val[k] = s;
    }
  }
}

// Second pass of the statistics: merge the per-chunk shifted sums of each channel.
//   part: [chunks][3][C] doubles = (shift, sum (y - shift), sum (y - shift)^2); chunk q
//   holds min(rows, M - q * rows) pixels. mean[c] = merged mean, var[c] = M2 / M (biased).
// One thread per channel, the chunks in order (deterministic); 256 threads per block.
static __global__ void __launch_bounds__(256)
    merge_shifted_stats_kernel(const double* __restrict__ part, int chunks, int rows,
                               int64_t M, int C, float* __restrict__ mean,
                               float* __restrict__ var) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0.0, m = 0.0, m2 = 0.0;
  for (int q = 0; q < chunks; ++q) {
    const int64_t start = static_cast<int64_t>(q) * rows;
    const double nb = static_cast<double>(M - start < rows ? M - start : rows);
    const double* pq = part + static_cast<int64_t>(q) * 3 * C + c;
    const double s1 = pq[C], mb = pq[0] + s1 / nb;
    const double raw = pq[2 * C] - s1 * s1 / nb;
    const double mb2 = raw < 0.0 ? 0.0 : raw;  // rounding can leave it below 0; NaN stays
    const double total = n + nb, d = mb - m;
    m += d * (nb / total);
    m2 += mb2 + d * d * (n * nb / total);
    n = total;
  }
  mean[c] = static_cast<float>(m);
  var[c] = static_cast<float>(n > 0.0 ? m2 / n : 0.0);
}

// Second pass of a sum: out[col] = sum_q part[q][col] over `chunks` rows of `cols` floats,
// in a fixed order. Columns [0, split) go to out0[col], [split, cols) to out1[col - split].
// Block (32, 8): threadIdx.x picks the column, row ty sums chunks ty, ty + 8, ... and the
// rows are combined with lane_sum.
template <typename Tout>
__global__ void __launch_bounds__(256)
    sum_chunks_kernel(const float* __restrict__ part, int chunks, int64_t cols, int64_t split,
                      Tout* __restrict__ out0, Tout* __restrict__ out1) {
  __shared__ float smem[8 * 32];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float s[1] = {0.f};
  if (col < cols) {
    for (int q = threadIdx.y; q < chunks; q += 8) s[0] += part[q * cols + col];
  }
  lane_sum<256, 1>(s, smem);
  if (threadIdx.y == 0 && col < cols) {
    if (col < split) {
      out0[col] = static_cast<Tout>(s[0]);
    } else {
      out1[col - split] = static_cast<Tout>(s[0]);
    }
  }
}

}  // namespace cuda
}  // namespace effnet
