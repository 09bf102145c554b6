// Per-channel BatchNorm vector math, one channel per call, shared by the CPU loops
// (cpu/bn_vectors.cpp) and the CUDA kernel (cuda/bn_vectors.cu) so both compute the same
// formulas. Python composite of the same math: effnet_kernels/ops/bn_math.py.
//
// Notation per channel c: mean, var = batch (or running) mean and biased variance of the
// conv output y; gamma, beta = BN affine; M = values per channel.
//   affine:   invstd = 1 / sqrt(var + eps), scale = gamma * invstd, shift = beta - mean * scale
//             so that batch_norm(y) = y * scale + shift
//   backward: from sum_g = sum(g) and sum_g_yc = sum(g * (y - mean)), g = dL/dz,
//             dL/dy = scale * g + coef_b + coef_c * (y - mean) with
//             coef_b = -scale * sum_g / M, coef_c = -scale * invstd^2 * sum_g_yc / M
//             (both 0 in eval, where mean and var are constants); dgamma = sum_g_yc * invstd
//   running:  running = momentum * batch + (1 - momentum) * running, with the unbiased variance
//             var * M / (M - 1) (PyTorch's BatchNorm rule)
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define EFFNET_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EFFNET_HOST_DEVICE inline
#endif

namespace effnet::bn {

template <typename A>
struct Affine {
  A invstd, scale, shift;
};

template <typename A>
EFFNET_HOST_DEVICE Affine<A> affine(A mean, A var, A gamma, A beta, A eps) {
  const A invstd = A(1) / std::sqrt(var + eps);
  const A scale = gamma * invstd;
  return {invstd, scale, beta - mean * scale};
}

template <typename A>
struct BackwardCoefs {
  A coef_b, coef_c, dgamma;
};

template <typename A>
EFFNET_HOST_DEVICE BackwardCoefs<A> backward_coefs(A scale, A invstd, A sum_g, A sum_g_yc,
                                                   A inv_count, bool training) {
  const A dgamma = sum_g_yc * invstd;
  if (!training) return {A(0), A(0), dgamma};
  return {-scale * sum_g * inv_count, -scale * invstd * invstd * sum_g_yc * inv_count, dgamma};
}

// momentum * batch + (1 - momentum) * running, in place: PyTorch's form, exact for
// momentum 1 (running + momentum * (batch - running) loses the batch variance's digits
// when it is much smaller than the running value it replaces).
template <typename A>
EFFNET_HOST_DEVICE void update_running(A& running_mean, A& running_var, A mean, A var,
                                       A momentum, A unbias) {
  running_mean = momentum * mean + (A(1) - momentum) * running_mean;
  running_var = momentum * (var * unbias) + (A(1) - momentum) * running_var;
}

}  // namespace effnet::bn
