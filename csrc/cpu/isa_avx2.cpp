// The CPU kernels for AVX2 + FMA (32-byte vectors); see isa_kernels.inc.
#include "depthwise_passes.h"
#include "gemm_microkernel_decl.h"
#include "pointwise_epilogue_decl.h"

#ifdef EFFNET_CPU_X86
#pragma GCC target("avx2,fma,f16c")
#define EFFNET_ISA avx2
#define EFFNET_ISA_VEC_BYTES 32
#include "isa_kernels.inc"
#endif
