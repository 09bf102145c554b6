// Argument checks for kernel entry points. Every message names the argument.
// Python validates user input before any kernel runs; these guard the C++ boundary.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define EFFNET_CHECK_DEVICE(t, dev)                                             \
  TORCH_CHECK((t).device() == (dev), #t " must be on ", (dev), ", got ", (t).device())
#define EFFNET_CHECK_DTYPE(t, dt)                                               \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ",  \
              (t).scalar_type())
#define EFFNET_CHECK_DIM(t, n)                                                  \
  TORCH_CHECK((t).dim() == (n), #t " must be ", (n), "-D, got shape ", (t).sizes())
#define EFFNET_CHECK_NUMEL(t, n)                                                \
  TORCH_CHECK((t).numel() == (n), #t " must have ", (n), " elements, got ",       \
              (t).numel())
#define EFFNET_CHECK_CONTIGUOUS(t)                                              \
  TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
// A 4-D float32 CPU activation in channels_last (NHWC) memory: the CPU GEMM kernels' input.
#define EFFNET_CHECK_CPU_FLOAT_NHWC(t)                                          \
  do {                                                                          \
    EFFNET_CHECK_DEVICE(t, at::kCPU);                                           \
    EFFNET_CHECK_DTYPE(t, at::kFloat);                                          \
    EFFNET_CHECK_DIM(t, 4);                                                     \
    TORCH_CHECK((t).is_contiguous(at::MemoryFormat::ChannelsLast),              \
                #t " must be contiguous in channels_last format");              \
  } while (false)

namespace effnet {

// A 4-D activation must be dense in NCHW or channels_last (NHWC) order.
inline at::MemoryFormat activation_format(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(false, name, " must be contiguous in NCHW or channels_last format");
}

// The activation codes of common/math.h's Act: 0 identity, 1 relu, 2 silu.
inline void check_act(int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 3,
              "act must be 0 (identity), 1 (relu), 2 (silu) or 3 (relu6), got ", act);
}

// Accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace effnet
