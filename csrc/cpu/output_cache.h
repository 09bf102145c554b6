// Reusable host memory for the CPU kernels' large outputs (see output_cache.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace effnet::cpu {

// An uninitialized CPU tensor of `sizes` in `fmt`; outputs of at least 64 KiB come from
// the cache, smaller ones from at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat fmt = at::MemoryFormat::Contiguous);

}  // namespace effnet::cpu
