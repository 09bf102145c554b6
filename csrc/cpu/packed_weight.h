// A 1x1 conv weight packed once for many products: the eval plans (nn/eval_plan.py) and
// the eval GEMM convs (nn/gemm_conv.py) keep one per weight, so pw_conv_act and
// dw_expand_forward skip their per-call packing (a copy of the weight into the native
// GEMM's w^T layout: 50-200 us per call on B0's 7x7-stage and head weights, the same at
// every batch size, so most of the cost of a batch-1 call of those layers).
//
// It serves only the weight it was made from, unchanged: the same memory, shape and
// version counter (never an inference tensor, which has none); and only the GEMM route it
// was packed for (gemm_set_mode may change the route later). Where it does not serve,
// callers pack per call as without it.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <memory>

#include "packed_gemm.h"

namespace effnet::cpu {

class PackedWeight {
 public:
  // weight (Cout, Cin, 1, 1) or (Cout, Cin), float32 on the CPU.
  explicit PackedWeight(const at::Tensor& weight);

  // The packed product for w (Cout, Cin, ...) when it still serves it, else nullptr;
  // raises if w has another shape than the packed weight.
  const XWtProduct* product_for(const at::Tensor& w) const;

  int64_t cout() const { return cout_; }
  int64_t cin() const { return cin_; }

 private:
  at::Tensor weight_;  // (Cout, Cin) contiguous; kept alive: the BLAS route reads it
  int64_t cout_, cin_, version_;
  bool native_;
  XWtProduct product_;
};

using PackedWeightPtr = std::shared_ptr<PackedWeight>;

}  // namespace effnet::cpu
