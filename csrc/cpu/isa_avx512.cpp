// The CPU kernels for AVX-512 (64-byte vectors); see isa_kernels.inc.
#include "depthwise_passes.h"
#include "gemm_microkernel_decl.h"
#include "pointwise_epilogue_decl.h"

#ifdef EFFNET_CPU_X86
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#define EFFNET_ISA avx512
#define EFFNET_ISA_VEC_BYTES 64
#include "isa_kernels.inc"
#endif
