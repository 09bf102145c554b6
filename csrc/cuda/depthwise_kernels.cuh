// Kernels of the fused depthwise conv + BatchNorm + activation op (launchers in
// depthwise_{stats,forward,backward_reduce,backward}.cu). Per channel c, with y = depthwise_conv(x, weight) recomputed on the
// fly (never stored) and z = y * scale[c] + shift[c]:
//   stats          shifted sums of y per chunk of pixels       -> merge_shifted_stats_kernel
//   forward        out = act(z)
//   backward_reduce g = dy * act'(z); sum g, sum g * (y - mean)   -> sum_chunks_kernel
//   backward_dyc   dyc = scale * g + coef_b + coef_c * (y - mean) (float32 temporary)
//   backward_dx    dx = conv_transpose(dyc, weight)               (gather over taps)
//   backward_dw    dweight = corr(x, dyc) per chunk of pixels     -> sum_chunks_kernel
// Thread mapping, layouts and offsets: see depthwise_tile.cuh. Reductions: reduce.cuh.
// Every thread with channel c0 >= C skips the pixel loop but still takes part in the
// block reductions (its columns are never written).
#pragma once

#include "common/math.h"
#include "cuda/depthwise_tile.cuh"
#include "cuda/reduce.cuh"

namespace effnet {
namespace cuda {

constexpr int kThreads = 256;    // threads of the pixel-loop kernels
constexpr int kDwThreads = 128;  // threads of the weight-gradient kernel (K*K accumulators)
// Minimum resident blocks per SM in __launch_bounds__: a 128-register budget. With the
// thread count alone, ptxas 13.0 capped some instances at 32-48 registers and spilled.
constexpr int kMinBlocks = 2;
constexpr int kDwMinBlocks = 4;

// This block's chunk of pixels [m0, m1) out of `total`.
__device__ __forceinline__ void chunk_range(int rows, int total, int& m0, int& m1) {
  const int64_t start = static_cast<int64_t>(blockIdx.y) * rows;
  m0 = static_cast<int>(start);
  m1 = static_cast<int>(start + rows < total ? start + rows : total);
}

// Per-chunk shifted sums of y: part [gridDim.y][3][C] doubles = (shift, sum (y - shift),
// sum (y - shift)^2). The shift is the mean of y at one pixel per lane spread evenly over
// the chunk (close to the chunk's mean, even where the chunk starts at a padded border row,
// so y - shift keeps its digits and the sums do not cancel); each thread sums
// kStatsFlush of its pixels in float and adds those partials into doubles, and the block
// reduces in double. A float running mean (Welford) would be rounded to ulp(mean) and
// enter M2 through the merges' cross terms. merge_shifted_stats_kernel merges the chunks.
constexpr int kStatsFlush = 4;

template <typename T, int K, int V, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    dw_stats_partial_kernel(const T* __restrict__ x, const T* __restrict__ w, DwGeom g,
                            int rows, double* __restrict__ part) {
  __shared__ __align__(16) float sw[K * K * 32 * V];
  __shared__ float sshift[32 * V];
  __shared__ double sred[kThreads / 32 * 2 * V * 32];
  const int width = blockDim.x * V, cl = threadIdx.x * V;
  const int c0 = blockIdx.x * width + cl;
  load_weight_tile<T, K>(w, g.C, blockIdx.x * width, width, sw);
  int m0, m1;
  chunk_range(rows, g.N * g.OH * g.OW, m0, m1);
  const int lanes = static_cast<int>(blockDim.y), ty = static_cast<int>(threadIdx.y);
  const int samples = min(lanes, m1 - m0);
  double sample[V];
#pragma unroll
  for (int v = 0; v < V; ++v) sample[v] = 0.0;
  if (c0 < g.C && ty < samples) {
    float y[V];
    const int m = m0 + static_cast<int>(static_cast<int64_t>(ty) * (m1 - m0) / samples);
    conv_at<T, K, V, CL>(x, sw, width, cl, g, c0, decode(m, g.OH, g.OW), y);
#pragma unroll
    for (int v = 0; v < V; ++v) sample[v] = y[v];
  }
  lane_sum<kThreads, V>(sample, sred);
  if (ty == 0 && c0 < g.C) {
#pragma unroll
    for (int v = 0; v < V; ++v) sshift[cl + v] = static_cast<float>(sample[v] / samples);
  }
  __syncthreads();
  float shift[V];
  double acc[2 * V];  // sum (y - shift) [0, V), sum (y - shift)^2 [V, 2V)
#pragma unroll
  for (int v = 0; v < V; ++v) {
    shift[v] = c0 < g.C ? sshift[cl + v] : 0.f;
    acc[v] = acc[V + v] = 0.0;
  }
  if (c0 < g.C) {
    for (int m = m0 + ty; m < m1;) {
      float p1[V], p2[V];
#pragma unroll
      for (int v = 0; v < V; ++v) p1[v] = p2[v] = 0.f;
      for (int j = 0; j < kStatsFlush && m < m1; ++j, m += lanes) {
        float y[V];
        conv_at<T, K, V, CL>(x, sw, width, cl, g, c0, decode(m, g.OH, g.OW), y);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float d = y[v] - shift[v];
          p1[v] += d;
          p2[v] = fmaf(d, d, p2[v]);
        }
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc[v] += p1[v];
        acc[V + v] += p2[v];
      }
    }
  }
  lane_sum<kThreads, 2 * V>(acc, sred);
  if (ty == 0 && c0 < g.C) {
    const int64_t o = static_cast<int64_t>(blockIdx.y) * 3 * g.C + c0;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      part[o + v] = shift[v];
      part[o + g.C + v] = acc[v];
      part[o + 2 * g.C + v] = acc[V + v];
    }
  }
}

// out = act(y * scale + shift), same layout as x, OH x OW.
template <typename T, int K, int V, bool CL, Act A>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    dw_forward_kernel(const T* __restrict__ x, const T* __restrict__ w,
                      const float* __restrict__ scale, const float* __restrict__ shift,
                      DwGeom g, int rows, T* __restrict__ out) {
  __shared__ __align__(16) float sw[K * K * 32 * V];
  const int width = blockDim.x * V, cl = threadIdx.x * V;
  const int c0 = blockIdx.x * width + cl;
  load_weight_tile<T, K>(w, g.C, blockIdx.x * width, width, sw);
  if (c0 >= g.C) return;  // no barrier below
  float sc[V], sh[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    sc[v] = ld_param(scale, c0 + v);
    sh[v] = ld_param(shift, c0 + v);
  }
  int m0, m1;
  chunk_range(rows, g.N * g.OH * g.OW, m0, m1);
  for (int m = m0 + threadIdx.y; m < m1; m += blockDim.y) {
    const Pixel p = decode(m, g.OH, g.OW);
    float y[V];
    conv_at<T, K, V, CL>(x, sw, width, cl, g, c0, p, y);
#pragma unroll
    for (int v = 0; v < V; ++v) y[v] = activate<A>(fmaf(y[v], sc[v], sh[v]));
    store_vec<T, V>(out + offset_of<CL>(p.n, c0, p.h, p.w, g.C, g.OH, g.OW), y);
  }
}

// Backward pass 1 (REDUCE = true): per-chunk sums part[q][c] = sum g, part[q][C + c] =
// sum g * (y - mean), part [gridDim.y][2C].
// Backward pass 2a (REDUCE = false): dyc = scale * g + coef_b + coef_c * (y - mean) as a
// float32 tensor in the layout of dy. coef_b / coef_c / dyc are unused when REDUCE.
template <typename T, int K, int V, bool CL, Act A, bool REDUCE>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    dw_backward_pointwise_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                 const T* __restrict__ w, const float* __restrict__ scale,
                                 const float* __restrict__ shift,
                                 const float* __restrict__ mean,
                                 const float* __restrict__ coef_b,
                                 const float* __restrict__ coef_c, DwGeom g, int rows,
                                 float* __restrict__ part, float* __restrict__ dyc) {
  __shared__ __align__(16) float sw[K * K * 32 * V];
  __shared__ float sred[REDUCE ? kThreads / 32 * 2 * V * 32 : 1];
  const int width = blockDim.x * V, cl = threadIdx.x * V;
  const int c0 = blockIdx.x * width + cl;
  load_weight_tile<T, K>(w, g.C, blockIdx.x * width, width, sw);
  float acc[2 * V];  // REDUCE: sum g [0, V), sum g * (y - mean) [V, 2V)
#pragma unroll
  for (int v = 0; v < 2 * V; ++v) acc[v] = 0.f;
  if (c0 < g.C) {
    float sc[V], sh[V], mu[V], cb[V], cc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      sc[v] = ld_param(scale, c0 + v);
      sh[v] = ld_param(shift, c0 + v);
      mu[v] = ld_param(mean, c0 + v);
      cb[v] = REDUCE ? 0.f : ld_param(coef_b, c0 + v);
      cc[v] = REDUCE ? 0.f : ld_param(coef_c, c0 + v);
    }
    int m0, m1;
    chunk_range(rows, g.N * g.OH * g.OW, m0, m1);
    for (int m = m0 + threadIdx.y; m < m1; m += blockDim.y) {
      const Pixel p = decode(m, g.OH, g.OW);
      float y[V], d[V];
      conv_at<T, K, V, CL>(x, sw, width, cl, g, c0, p, y);
      const int64_t o = offset_of<CL>(p.n, c0, p.h, p.w, g.C, g.OH, g.OW);
      load_vec<T, V>(dy + o, d);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float gv = d[v] * activate_grad<A>(fmaf(y[v], sc[v], sh[v]));
        const float yc = y[v] - mu[v];
        if constexpr (REDUCE) {
          acc[v] += gv;
          acc[V + v] = fmaf(gv, yc, acc[V + v]);
        } else {
          d[v] = fmaf(cc[v], yc, fmaf(sc[v], gv, cb[v]));
        }
      }
      if constexpr (!REDUCE) store_vec<float, V>(dyc + o, d);
    }
  }
  if constexpr (REDUCE) {
    lane_sum<kThreads, 2 * V>(acc, sred);
    if (threadIdx.y == 0 && c0 < g.C) {
      const int64_t o = static_cast<int64_t>(blockIdx.y) * 2 * g.C + c0;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        part[o + v] = acc[v];
        part[o + g.C + v] = acc[V + v];
      }
    }
  }
}

// dx[n, c, ih, iw] = sum over taps (i, j) with ih = oh * S - pt + i, iw = ow * S - pl + j
// (0 <= oh < OH, 0 <= ow < OW) of w[c, i, j] * dyc[n, c, oh, ow]. One thread per input
// pixel and V channels; chunks are over input pixels mi = (n * H + ih) * W + iw.
template <typename T, int K, int V, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    dw_dx_kernel(const float* __restrict__ dyc, const T* __restrict__ w, DwGeom g, int rows,
                 T* __restrict__ dx) {
  __shared__ __align__(16) float sw[K * K * 32 * V];
  const int width = blockDim.x * V, cl = threadIdx.x * V;
  const int c0 = blockIdx.x * width + cl;
  load_weight_tile<T, K>(w, g.C, blockIdx.x * width, width, sw);
  if (c0 >= g.C) return;  // no barrier below
  const int64_t pix = CL ? g.C : 1;                     // step of ow in dyc
  const int64_t row = static_cast<int64_t>(g.OW) * pix;  // step of oh in dyc
  int m0, m1;
  chunk_range(rows, g.N * g.H * g.W, m0, m1);
  for (int m = m0 + threadIdx.y; m < m1; m += blockDim.y) {
    const Pixel p = decode(m, g.H, g.W);
    const int64_t base = offset_of<CL>(p.n, c0, 0, 0, g.C, g.OH, g.OW);
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      int oh = p.h + g.pt - i;  // = oh * S when tap i of output row oh reads input row p.h
      if (oh < 0) continue;
      if (g.S == 2) {
        if (oh & 1) continue;
        oh >>= 1;
      }
      if (oh >= g.OH) continue;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        int ow = p.w + g.pl - j;
        if (ow < 0) continue;
        if (g.S == 2) {
          if (ow & 1) continue;
          ow >>= 1;
        }
        if (ow >= g.OW) continue;
        float d[V], wv[V];
        load_vec<float, V>(dyc + base + oh * row + ow * pix, d);
        load_smem_vec<V>(sw + (i * K + j) * width + cl, wv);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = fmaf(d[v], wv[v], acc[v]);
      }
    }
    store_vec<T, V>(dx + offset_of<CL>(p.n, c0, p.h, p.w, g.C, g.H, g.W), acc);
  }
}

// Per-chunk weight gradient: part[q][c * K*K + i * K + j] =
//   sum over the chunk's output pixels (n, oh, ow) of
//   x[n, c, oh*S - pt + i, ow*S - pl + j] * dyc[n, c, oh, ow].
// One channel per thread column (V = 1), K*K accumulators per thread, kDwThreads threads.
template <typename T, int K, bool CL>
__global__ void __launch_bounds__(kDwThreads, kDwMinBlocks)
    dw_dweight_partial_kernel(const T* __restrict__ x, const float* __restrict__ dyc, DwGeom g,
                              int rows, float* __restrict__ part) {
  __shared__ float sred[kDwThreads / 32 * K * K * 32];
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  float acc[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) acc[t] = 0.f;
  if (c < g.C) {
    const int64_t pix = CL ? g.C : 1, row = static_cast<int64_t>(g.W) * pix;
    int m0, m1;
    chunk_range(rows, g.N * g.OH * g.OW, m0, m1);
    for (int m = m0 + threadIdx.y; m < m1; m += blockDim.y) {
      const Pixel p = decode(m, g.OH, g.OW);
      const float d = __ldg(dyc + offset_of<CL>(p.n, c, p.h, p.w, g.C, g.OH, g.OW));
      const int64_t base = offset_of<CL>(p.n, c, 0, 0, g.C, g.H, g.W);
      const int ih0 = p.h * g.S - g.pt, iw0 = p.w * g.S - g.pl;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const int ih = ih0 + i;
        if (static_cast<unsigned>(ih) >= static_cast<unsigned>(g.H)) continue;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const int iw = iw0 + j;
          if (static_cast<unsigned>(iw) >= static_cast<unsigned>(g.W)) continue;
          float xv[1];
          load_vec<T, 1>(x + base + ih * row + iw * pix, xv);
          acc[i * K + j] = fmaf(xv[0], d, acc[i * K + j]);
        }
      }
    }
  }
  lane_sum<kDwThreads, K * K>(acc, sred);
  if (threadIdx.y == 0 && c < g.C) {
    float* dst = part + (static_cast<int64_t>(blockIdx.y) * g.C + c) * (K * K);
#pragma unroll
    for (int t = 0; t < K * K; ++t) dst[t] = acc[t];
  }
}

}  // namespace cuda
}  // namespace effnet
