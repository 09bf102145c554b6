// The CPU kernels for the baseline ISA (16-byte vectors); see isa_kernels.inc.
#include "depthwise_passes.h"
#include "gemm_microkernel_decl.h"
#include "pointwise_epilogue_decl.h"

#define EFFNET_ISA base
#define EFFNET_ISA_VEC_BYTES 16
#define EFFNET_ISA_FLOAT64 1
#include "isa_kernels.inc"
