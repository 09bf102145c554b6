// CPU primitives of drop-connect + residual add (defined in drop_connect.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace effnet::cpu_dc {

// out = shortcut + x * scale[n]; x and shortcut dense in one memory format.
at::Tensor dc_forward(const at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& scale);

// dx = dy * scale[n]; dy dense in NCHW or channels_last.
at::Tensor dc_backward(const at::Tensor& dy, const at::Tensor& scale);

}  // namespace effnet::cpu_dc
