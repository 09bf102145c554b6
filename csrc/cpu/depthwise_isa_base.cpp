// The depthwise row kernels (depthwise_kernels.h) compiled for the baseline ISA, 16-byte
// vectors; declared in depthwise_passes.h and picked at runtime by depthwise_bn_act.cpp.
// One translation unit per ISA so the three copies compile in parallel.
#include "depthwise_passes.h"

namespace effnet::cpu_dw::base {
constexpr int kVecBytes = 16;
#include "vec_math.h"
#include "depthwise_kernels.h"
EFFNET_DW_INSTANTIATE_PASSES()
}  // namespace effnet::cpu_dw::base
