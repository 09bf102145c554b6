// CUDA primitives of squeeze-and-excitation (semantics: effnet_kernels/ops/reference.py).
// x and dy are dense (N, C, H, W) in NCHW or channels_last; (N, C) vectors (sums, gate,
// dmean) are contiguous in the accumulation type A (float; double for float64):
//
//   se_pool(x)                       s[n, c] = sum_hw x
//   se_pool_dy_x(dy, x)              s[n, c] = sum_hw dy * x
//   se_scale(x, gate)                out = x * gate[n, c]
//   se_backward_dx(dy, gate, dmean)  dx  = dy * gate[n, c] + dmean[n, c]
//
// Reductions are two-stage and deterministic: blocks write per-chunk partials
// part[n][q][c] (chunk q = a fixed range of pixels), reduced inside a block by a fixed
// shuffle / shared-memory tree; the partials are then summed over q by at::sum. No atomics,
// so results are bitwise reproducible for a given shape.
//   NCHW: one warp per (n, c) plane chunk, lanes stride the contiguous pixels.
//   channels_last: a (32 channels x 8 pixel rows) block; lanes read 32 consecutive channels.
// Elementwise passes use the same two layouts; every offset is int64.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "common/checks.h"
#include "cuda/ops.h"

namespace effnet::cuda_se {

constexpr int kWarps = 8;           // warps (NCHW planes, or channels_last pixel rows) per block
constexpr int64_t kPlaneChunk = 2048;  // NCHW reduction: pixels per warp task
constexpr int64_t kRowChunk = 256;     // channels_last reduction: pixels per block task
constexpr int kPixPerBlock = 1024;     // NCHW elementwise: pixels per block (4 per thread)
constexpr int kRowsPerBlock = 32;      // channels_last elementwise: pixels per block (4 per row)

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// NCHW: warp w of block (blockIdx.x) reduces plane i = blockIdx.x * kWarps + w over pixel
// chunk q = blockIdx.y.  part: [N * C planes][chunks] is laid out as [n][q][c].
template <bool kDot, typename T, typename A>
__global__ void __launch_bounds__(kWarps * 32)
    reduce_nchw_kernel(const T* __restrict__ a, const T* __restrict__ b, A* __restrict__ part,
                       int64_t planes, int64_t C, int64_t HW, int64_t chunks) {
  const int lane = threadIdx.x & 31;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t q = blockIdx.y;
  if (plane >= planes) return;  // whole warps exit together
  const int64_t start = q * kPlaneChunk;
  const int64_t end = min(HW, start + kPlaneChunk);
  const int64_t base = plane * HW;
  A acc = 0;
  for (int64_t p = start + lane; p < end; p += 32) {
    const A v = static_cast<A>(a[base + p]);
    acc += kDot ? v * static_cast<A>(b[base + p]) : v;
  }
  acc = warp_sum(acc);
  if (lane == 0) {
    const int64_t n = plane / C, c = plane - n * C;
    part[(n * chunks + q) * C + c] = acc;
  }
}

// channels_last: block (32, kWarps) covers channels [blockIdx.x * 32, +32) of image
// blockIdx.z over pixel chunk q = blockIdx.y; row ty takes pixels ty, ty + kWarps, ...
template <bool kDot, typename T, typename A>
__global__ void __launch_bounds__(kWarps * 32)
    reduce_nhwc_kernel(const T* __restrict__ a, const T* __restrict__ b, A* __restrict__ part,
                       int64_t C, int64_t HW, int64_t chunks) {
  __shared__ A smem[kWarps][32];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t q = blockIdx.y, n = blockIdx.z;
  const int64_t start = q * kRowChunk;
  const int64_t end = min(HW, start + kRowChunk);
  A acc = 0;
  if (c < C) {
    for (int64_t p = start + threadIdx.y; p < end; p += kWarps) {
      const int64_t off = (n * HW + p) * C + c;
      const A v = static_cast<A>(a[off]);
      acc += kDot ? v * static_cast<A>(b[off]) : v;
    }
  }
  smem[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    A s = smem[0][threadIdx.x];
    for (int r = 1; r < kWarps; ++r) s += smem[r][threadIdx.x];  // fixed order
    part[(n * chunks + q) * C + c] = s;
  }
}

// NCHW: block (blockIdx.x = plane, blockIdx.y = pixel block) of 256 threads, 4 pixels each.
template <bool kBias, typename T, typename A>
__global__ void __launch_bounds__(256)
    affine_nchw_kernel(const T* __restrict__ in, T* __restrict__ out, const A* __restrict__ g,
                       const A* __restrict__ bias, int64_t HW) {
  const int64_t plane = blockIdx.x;
  const A gv = g[plane];
  const A bv = kBias ? bias[plane] : A(0);
  const int64_t base = plane * HW;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kPixPerBlock + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kPixPerBlock / 256; ++k) {
    const int64_t p = p0 + k * 256;
    if (p < HW) {
      const A v = static_cast<A>(in[base + p]) * gv;
      out[base + p] = static_cast<T>(kBias ? v + bv : v);
    }
  }
}

// channels_last: block (32, kWarps): channels [blockIdx.y * 32, +32), pixel rows
// [blockIdx.x * kRowsPerBlock, +kRowsPerBlock) of the flattened N * HW pixels.
template <bool kBias, typename T, typename A>
__global__ void __launch_bounds__(kWarps * 32)
    affine_nhwc_kernel(const T* __restrict__ in, T* __restrict__ out, const A* __restrict__ g,
                       const A* __restrict__ bias, int64_t C, int64_t HW, int64_t pixels) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  if (c >= C) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
#pragma unroll
  for (int k = 0; k < kRowsPerBlock / kWarps; ++k) {
    const int64_t r = r0 + k * kWarps;  // flattened pixel n * HW + p
    if (r < pixels) {
      const int64_t nc = (r / HW) * C + c;
      const A v = static_cast<A>(in[r * C + c]) * g[nc];
      out[r * C + c] = static_cast<T>(kBias ? v + bias[nc] : v);
    }
  }
}

// ---- host side ------------------------------------------------------------------------

bool is_channels_last(const at::Tensor& t, const char* name) {
  return activation_format(t, name) == at::MemoryFormat::ChannelsLast;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

void check_vec(const at::Tensor& v, const char* name, const at::Tensor& x) {
  check_cuda(v, name);
  TORCH_CHECK(v.device() == x.device(), name, " must be on ", x.device(), ", got ", v.device());
  TORCH_CHECK(v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == x.size(1), name,
              " must have shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc_type_of(x.scalar_type()), name, " must have dtype ",
              acc_type_of(x.scalar_type()), ", got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), name, " must be contiguous");
}

at::Tensor reduce(const at::Tensor& a, const at::Tensor* b) {
  check_cuda(a, "x");
  const bool cl = is_channels_last(a, "x");
  if (b) {
    check_cuda(*b, "dy");
    TORCH_CHECK(b->device() == a.device(), "dy must be on ", a.device(), ", got ", b->device());
    TORCH_CHECK(b->sizes() == a.sizes(), "dy must have x's shape ", a.sizes(), ", got ",
                b->sizes());
    TORCH_CHECK(b->scalar_type() == a.scalar_type(), "dy must have dtype ", a.scalar_type(),
                ", got ", b->scalar_type());
    TORCH_CHECK(is_channels_last(*b, "dy") == cl, "dy must have the memory format of x");
  }
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t N = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  const auto acc = acc_type_of(a.scalar_type());
  if (a.numel() == 0) return at::zeros({N, C}, a.options().dtype(acc));
  const int64_t chunks = (HW + (cl ? kRowChunk : kPlaneChunk) - 1) / (cl ? kRowChunk : kPlaneChunk);
  TORCH_CHECK(chunks <= 65535 && N <= 65535, "x is too large for se_pool (N * H * W)");
  auto part = at::empty({N, chunks, C}, a.options().dtype(acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "se_reduce_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b ? b->const_data_ptr<scalar_t>() : nullptr;
    A* pp = part.data_ptr<A>();
    if (cl) {
      const dim3 grid((C + 31) / 32, chunks, N), block(32, kWarps);
      if (b) {
        reduce_nhwc_kernel<true, scalar_t, A>
            <<<grid, block, 0, stream>>>(ap, bp, pp, C, HW, chunks);
      } else {
        reduce_nhwc_kernel<false, scalar_t, A>
            <<<grid, block, 0, stream>>>(ap, bp, pp, C, HW, chunks);
      }
    } else {
      const dim3 grid((N * C + kWarps - 1) / kWarps, chunks), block(kWarps * 32);
      if (b) {
        reduce_nchw_kernel<true, scalar_t, A>
            <<<grid, block, 0, stream>>>(ap, bp, pp, N * C, C, HW, chunks);
      } else {
        reduce_nchw_kernel<false, scalar_t, A>
            <<<grid, block, 0, stream>>>(ap, bp, pp, N * C, C, HW, chunks);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return chunks == 1 ? part.view({N, C}) : part.sum(1);
}

at::Tensor affine(const at::Tensor& in, const char* name, const at::Tensor& g,
                  const at::Tensor* bias) {
  check_cuda(in, name);
  const bool cl = is_channels_last(in, name);
  check_vec(g, "gate", in);
  if (bias) check_vec(*bias, "dmean", in);
  const c10::cuda::CUDAGuard guard(in.device());
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto out = at::empty(in.sizes(), in.options().memory_format(fmt));
  if (in.numel() == 0) return out;
  const int64_t N = in.size(0), C = in.size(1), HW = in.size(2) * in.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = in.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "se_affine_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const A* gp = g.const_data_ptr<A>();
    const A* bp = bias ? bias->const_data_ptr<A>() : nullptr;
    if (cl) {
      const int64_t pixels = N * HW;
      const int64_t cblocks = (C + 31) / 32;
      TORCH_CHECK(cblocks <= 65535, name, " has too many channels (", C, ")");
      const dim3 grid((pixels + kRowsPerBlock - 1) / kRowsPerBlock, cblocks), block(32, kWarps);
      if (bias) {
        affine_nhwc_kernel<true, scalar_t, A>
            <<<grid, block, 0, stream>>>(ip, op, gp, bp, C, HW, pixels);
      } else {
        affine_nhwc_kernel<false, scalar_t, A>
            <<<grid, block, 0, stream>>>(ip, op, gp, bp, C, HW, pixels);
      }
    } else {
      const int64_t pblocks = (HW + kPixPerBlock - 1) / kPixPerBlock;
      TORCH_CHECK(pblocks <= 65535, name, " has too many pixels per image (", HW, ")");
      const dim3 grid(N * C, pblocks), block(256);
      if (bias) {
        affine_nchw_kernel<true, scalar_t, A><<<grid, block, 0, stream>>>(ip, op, gp, bp, HW);
      } else {
        affine_nchw_kernel<false, scalar_t, A><<<grid, block, 0, stream>>>(ip, op, gp, bp, HW);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor se_pool(const at::Tensor& x) { return reduce(x, nullptr); }
at::Tensor se_pool_dy_x(const at::Tensor& dy, const at::Tensor& x) { return reduce(x, &dy); }
at::Tensor se_scale(const at::Tensor& x, const at::Tensor& gate) {
  return affine(x, "x", gate, nullptr);
}
at::Tensor se_backward_dx(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& dmean) {
  return affine(dy, "dy", gate, &dmean);
}

}  // namespace effnet::cuda_se
