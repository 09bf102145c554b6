// The depthwise row kernels (depthwise_kernels.h) compiled for AVX2 + FMA, 32-byte
// vectors; declared in depthwise_passes.h and picked at runtime by depthwise_bn_act.cpp.
// One translation unit per ISA so the three copies compile in parallel.
#include "depthwise_passes.h"

#ifdef EFFNET_DW_X86
#pragma GCC target("avx2,fma,f16c")
namespace effnet::cpu_dw::avx2 {
constexpr int kVecBytes = 32;
#include "vec_math.h"
#include "depthwise_kernels.h"
EFFNET_DW_INSTANTIATE_PASSES()
}  // namespace effnet::cpu_dw::avx2
#endif
