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
// Batch statistics use Chan's parallel merge of (count, mean, M2):
//   n = na + nb,  d = mb - ma,  mean = ma + d * nb / n,  M2 = M2a + M2b + d^2 * na * nb / n
// (a side with n = 0 leaves the other unchanged); var = M2 / n.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace effnet {
namespace cuda {

// (na, ma, Ma) <- merge with (nb, mb, Mb), V channels sharing one count.
template <int V>
__device__ __forceinline__ void chan_merge(float& na, float (&ma)[V], float (&Ma)[V], float nb,
                                           const float (&mb)[V], const float (&Mb)[V]) {
  const float n = na + nb;
  const float f = n > 0.f ? nb / n : 0.f;  // nb / n
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const float d = mb[v] - ma[v];
    ma[v] = fmaf(d, f, ma[v]);
    Ma[v] = Ma[v] + Mb[v] + d * d * na * f;
  }
  na = n;
}

// Column sums of NV values over the lanes of an NT-thread block (result in row 0).
// smem: NT / 32 * NV * 32 floats.
template <int NT, int NV>
__device__ __forceinline__ void lane_sum(float (&val)[NV], float* smem) {
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
      float s = smem[k * 32 + tid];
      for (int w = 1; w < NT / 32; ++w) s += smem[(w * NV + k) * 32 + tid];
      val[k] = s;
    }
  }
}

// Column Chan merge of (n, mean[V], M2[V]) over the lanes (result in row 0).
// smem: NT / 32 * (2V + 1) * 32 floats.
template <int NT, int V>
__device__ __forceinline__ void lane_chan_merge(float& n, float (&mean)[V], float (&m2)[V],
                                                float* smem) {
  constexpr int NV = 2 * V + 1;  // record: n, mean[0..V), m2[0..V)
  const int cx = blockDim.x;
  const int tid = threadIdx.y * cx + threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int o = 16; o >= cx; o >>= 1) {
    float mb[V], Mb[V];
    const float nb = __shfl_xor_sync(0xffffffffu, n, o);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      mb[v] = __shfl_xor_sync(0xffffffffu, mean[v], o);
      Mb[v] = __shfl_xor_sync(0xffffffffu, m2[v], o);
    }
    chan_merge<V>(n, mean, m2, nb, mb, Mb);
  }
  __syncthreads();
  if (lane < cx) {
    float* rec = smem + warp * NV * 32 + lane;
    rec[0] = n;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      rec[(1 + v) * 32] = mean[v];
      rec[(1 + V + v) * 32] = m2[v];
    }
  }
  __syncthreads();
  if (tid < cx) {
    for (int w = 1; w < NT / 32; ++w) {
      const float* rec = smem + w * NV * 32 + tid;
      float mb[V], Mb[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        mb[v] = rec[(1 + v) * 32];
        Mb[v] = rec[(1 + V + v) * 32];
      }
      chan_merge<V>(n, mean, m2, rec[0], mb, Mb);
    }
  }
}

// Second pass of the statistics: merge per-chunk (mean, M2) partials of each channel.
//   part_mean, part_m2: [chunks][C]; chunk q holds min(rows, M - q * rows) pixels.
//   mean[c] = merged mean, var[c] = M2 / M (biased).
// Block (32, 8): threadIdx.x picks the channel, row ty merges chunks ty, ty + 8, ...
static __global__ void __launch_bounds__(256)
    merge_stats_kernel(const float* __restrict__ part_mean, const float* __restrict__ part_m2,
                       int chunks, int rows, int64_t M, int C, float* __restrict__ mean,
                       float* __restrict__ var) {
  __shared__ float smem[8 * 3 * 32];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float n = 0.f, m[1] = {0.f}, m2[1] = {0.f};
  if (c < C) {
    for (int q = threadIdx.y; q < chunks; q += 8) {
      const int64_t start = static_cast<int64_t>(q) * rows;
      const float nb = static_cast<float>(M - start < rows ? M - start : rows);
      const float mb[1] = {part_mean[static_cast<int64_t>(q) * C + c]};
      const float Mb[1] = {part_m2[static_cast<int64_t>(q) * C + c]};
      chan_merge<1>(n, m, m2, nb, mb, Mb);
    }
  }
  lane_chan_merge<256, 1>(n, m, m2, smem);
  if (threadIdx.y == 0 && c < C) {
    mean[c] = m[0];
    var[c] = n > 0.f ? m2[0] / n : 0.f;
  }
}

// Second pass of a sum: out[col] = sum_q part[q][col] over `chunks` rows of `cols` floats,
// in a fixed order. Columns [0, split) go to out0[col], [split, cols) to out1[col - split].
// Block (32, 8) as in merge_stats_kernel.
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
