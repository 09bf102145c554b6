// NCHW <-> channels_last copies of CPU tensors (see layout_copy.cpp).
#pragma once

#include <torch/extension.h>

namespace effnet::cpu {

// dst.copy_(src) for tensors of the same sizes and dtype; a dense NCHW <-> dense
// channels_last copy runs as a tiled transpose, anything else as at::Tensor::copy_.
void copy_layout(at::Tensor& dst, const at::Tensor& src);

}  // namespace effnet::cpu
