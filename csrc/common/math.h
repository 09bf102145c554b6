// Per-element math shared by the CPU and CUDA kernels (host + device inline).
//
// BatchNorm folded to an affine map:  z = y * scale[c] + shift[c]
//   scale = gamma * invstd,  shift = beta - mean * scale,  invstd = 1 / sqrt(var + eps)
// Activations act(z) and their derivatives act'(z), selected by the Act code
// that Python passes as an int (0 identity, 1 relu, 2 silu, 3 relu6 = min(max(z, 0), 6));
// relu and relu6 pass NaN through, as PyTorch's do.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EFFNET_HD __host__ __device__ __forceinline__
#else
#define EFFNET_HD inline
#endif

namespace effnet {

enum class Act : int { Identity = 0, ReLU = 1, SiLU = 2, ReLU6 = 3 };

template <typename T>
EFFNET_HD T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

template <Act A, typename T>
EFFNET_HD T activate(T z) {
  if constexpr (A == Act::ReLU) {
    return z < T(0) ? T(0) : z;
  } else if constexpr (A == Act::SiLU) {
    return z * sigmoid(z);
  } else if constexpr (A == Act::ReLU6) {
    return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
  } else {
    return z;
  }
}

// d act(z) / dz.  silu'(z) = s + z * s * (1 - s) with s = sigmoid(z); relu'(z) = 0 where
// z <= 0, relu6'(z) = 0 where z <= 0 or z >= 6 (zero at the kinks), 1 elsewhere, NaN
// included, as PyTorch's threshold_backward and hardtanh_backward pass the gradient there.
template <Act A, typename T>
EFFNET_HD T activate_grad(T z) {
  if constexpr (A == Act::ReLU) {
    return z <= T(0) ? T(0) : T(1);
  } else if constexpr (A == Act::SiLU) {
    const T s = sigmoid(z);
    return s * (T(1) + z * (T(1) - s));
  } else if constexpr (A == Act::ReLU6) {
    return z <= T(0) || z >= T(6) ? T(0) : T(1);
  } else {
    return T(1);
  }
}

}  // namespace effnet
