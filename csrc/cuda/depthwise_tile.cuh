// Device building blocks of the depthwise conv kernels: geometry, vector loads, the
// per-block weight tile in shared memory, and the k x k convolution at one output pixel.
//
// Thread mapping (shared by every pixel-loop kernel, see depthwise_kernels.cuh):
//   block = (cx, lanes), cx * lanes = NT threads, cx a power of two <= 32.
//   channels_last (CL): threadIdx.x owns V consecutive channels
//       c0 = blockIdx.x * (cx * V) + threadIdx.x * V,
//     threadIdx.y is a pixel lane; a warp reads cx * V contiguous channels of 32 / cx pixels.
//   NCHW: cx = 1, V = 1, one channel per block (c0 = blockIdx.x), all NT threads are pixel
//     lanes; consecutive lanes read consecutive ow (contiguous in memory).
//   blockIdx.y is a chunk of `rows` consecutive pixels m = (n * OH + oh) * OW + ow; lane
//   `ty` visits m = chunk_start + ty, + lanes, ... < chunk_end.
// Element offsets (int64):
//   CL:   x[n, c, h, w] at ((n * H + h) * W + w) * C + c
//   NCHW: x[n, c, h, w] at ((n * C + c) * H + h) * W + w
// Pixel indices (m) are int: the host checks N * H * W and N * OH * OW < 2^31.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace effnet {
namespace cuda {

// Shape of one depthwise conv: input N x C x H x W, output N x C x OH x OW.
struct DwGeom {
  int N, C, H, W, OH, OW;
  int S;       // stride (1 or 2)
  int pt, pl;  // top / left padding; bottom / right implied by OH, OW
};

// V elements of T as one aligned register bundle (one vector memory access).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Unsigned integer of the same size as Pack<T, V>, used for the raw (vector) load.
template <int Bytes> struct RawOf;
template <> struct RawOf<2> { using type = unsigned short; };
template <> struct RawOf<4> { using type = unsigned int; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<16> { using type = uint4; };

// Read-only (texture path) load of V elements, converted to float. p is V*sizeof(T) aligned.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
  using Raw = typename RawOf<sizeof(T) * V>::type;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(p));
  Pack<T, V> pk;
  memcpy(&pk, &raw, sizeof(raw));
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = static_cast<float>(pk.v[v]);
}

// Store V floats as T (round to nearest), one vector store.
template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[V]) {
  using Raw = typename RawOf<sizeof(T) * V>::type;
  Pack<T, V> pk;
#pragma unroll
  for (int v = 0; v < V; ++v) pk.v[v] = static_cast<T>(in[v]);
  Raw raw;
  memcpy(&raw, &pk, sizeof(raw));
  *reinterpret_cast<Raw*>(p) = raw;
}

// V floats from shared memory (16-byte aligned when V == 4).
template <int V>
__device__ __forceinline__ void load_smem_vec(const float* p, float (&out)[V]) {
  const Pack<float, V> pk = *reinterpret_cast<const Pack<float, V>*>(p);
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = pk.v[v];
}

// Per-channel float32 parameters (scale, shift, ...) of this thread's V channels.
__device__ __forceinline__ float ld_param(const float* p, int c) { return __ldg(p + c); }

// The block's weight tile: sw[t * width + cl] = weight[cbase + cl, 0, t / K, t % K] for
// tap t < K*K and local channel cl < width = cx * V; zero past C. Ends with a barrier.
template <typename T, int K>
__device__ __forceinline__ void load_weight_tile(const T* __restrict__ w, int C, int cbase,
                                                 int width, float* sw) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nt = blockDim.x * blockDim.y;
  for (int i = tid; i < K * K * width; i += nt) {
    const int t = i / width, c = cbase + i % width;
    sw[i] = c < C ? static_cast<float>(w[static_cast<int64_t>(c) * K * K + t]) : 0.f;
  }
  __syncthreads();
}

// Output pixel m -> (n, oh, ow).
struct Pixel {
  int n, h, w;
};
__device__ __forceinline__ Pixel decode(int m, int H, int W) {
  const int t = m / W;
  return {t / H, t % H, m - t * W};
}

// Offset of element (n, c, h, w) of an N x C x H x W tensor in layout CL / NCHW.
template <bool CL>
__device__ __forceinline__ int64_t offset_of(int n, int c, int h, int w, int C, int H, int W) {
  if constexpr (CL) {
    return ((static_cast<int64_t>(n) * H + h) * W + w) * C + c;
  } else {
    return ((static_cast<int64_t>(n) * C + c) * H + h) * W + w;
  }
}

// y[v] = sum_{i,j < K} x[n, c0+v, oh*S - pt + i, ow*S - pl + j] * w[c0+v, i, j] for the
// output pixel p; taps outside the image read as zero. sw is the block's weight tile and
// cl = threadIdx.x * V the thread's local channel.
template <typename T, int K, int V, bool CL>
__device__ __forceinline__ void conv_at(const T* __restrict__ x, const float* sw, int width,
                                        int cl, const DwGeom& g, int c0, Pixel p,
                                        float (&y)[V]) {
  const int ih0 = p.h * g.S - g.pt, iw0 = p.w * g.S - g.pl;
  const int64_t pix = CL ? g.C : 1;                      // step of w
  const int64_t row = static_cast<int64_t>(g.W) * pix;   // step of h
  const int64_t base = offset_of<CL>(p.n, c0, 0, 0, g.C, g.H, g.W);
#pragma unroll
  for (int v = 0; v < V; ++v) y[v] = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int ih = ih0 + i;
    if (static_cast<unsigned>(ih) >= static_cast<unsigned>(g.H)) continue;  // also ih < 0
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int iw = iw0 + j;
      if (static_cast<unsigned>(iw) >= static_cast<unsigned>(g.W)) continue;
      float xv[V], wv[V];
      load_vec<T, V>(x + base + ih * row + iw * pix, xv);
      load_smem_vec<V>(sw + (i * K + j) * width + cl, wv);
#pragma unroll
      for (int v = 0; v < V; ++v) y[v] = fmaf(xv[v], wv[v], y[v]);
    }
  }
}

}  // namespace cuda
}  // namespace effnet
