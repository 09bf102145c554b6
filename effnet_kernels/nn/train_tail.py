"""Training tail of a block with squeeze-excite on CPU: the SE gate folded into the
projection conv, so the gated activation y * gate is never written, read back or saved.

    y     = act(BN(depthwise_conv(x)))       fused op; its forward kernel also emits
    sums  = sum over pixels of y  (N, C)     the SE pool (no pass of its own)
    gate  = sigmoid(W_e act(W_r sums / HW + b_r) + b_e)       the SE MLP, (N, C)
    p_n   = y_n @ (W * gate[n])^T            (HW, Cout) per sample n: the gate scales the
                                             projection's weights instead of y
    out   = act(BN(p))                       batch statistics; p is kept (it is narrow)

Backward, from dp = dL/dp (the BN + act backward over the kept p):
    M_n   = dp_n^T @ y_n                     (Cout, C), one product per sample: the FLOPs
                                             of the weight gradient's single product
    dW    = sum_n M_n * gate[n]
    dgate = sum_o W * M_n                    = sum_hw (dp_n @ W) * y_n, never forming dp @ W
    dmean = the MLP's backward of dgate      (N, C), the gradient each pixel of y gets
                                             through the pooled mean (already / HW)
    dy_n  = dp_n @ (W * gate[n]) + dmean[n]  one product per sample, the bias added as
                                             its epilogue (csrc/cpu/pointwise_conv.cpp)

Unfused, the SE scale pass writes y * gate, the projection reads that and saves it, its
backward writes dL/d(y * gate), which the SE backward reads twice (with y) to write dy.
Here none of those passes exist and the block saves y only. M holds N * Cout * C values,
so the tail runs where H * W >= Cout (M no larger than y); the late 7x7 stages of
EfficientNet keep the unfused order, as the eval tail does (nn/eval_tail.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._ext import ext_module
from ..backends import remember_backend, runs_forward_backend, select
from ..ops.activations import act_code
from ..ops.bn_math import as_dtype, running_stats, update_running, vector_math
from ..ops.depthwise import OP as DEPTHWISE_OP
from ..ops.eager import plain_eager
from ..ops.squeeze_excite import bias_or_zeros, excite_mlp, mlp_backward
from .batchnorm import bn_call_args, is_plain_batchnorm
from .conv_bn_act import is_same_conv
from .gemm_conv import epilogue_gemm_serves, gemm_conv1x1_act, gemm_conv_layout, sample_rows
from .pointwise import bn_act_backward, bn_act_forward, bn_param_grads

# Switch for in-process A/B measurements (benchmarks); the unfused order is always correct.
ENABLED = True

_DTYPES = (torch.float32, torch.float64)


def train_tail_applies(y: Tensor, projection: tuple) -> bool:
    """Whether se_projection_train may run the projection (conv, bn, act) on the depthwise
    output y: a plain eager call on a plain tensor, and tail_shapes_fit."""
    return plain_eager(y) and type(y) is torch.Tensor and tail_shapes_fit(y, projection)


def tail_shapes_fit(y: Tensor, projection: tuple) -> bool:
    """The tail's conditions on tensors and modules, from metadata only: CPU float32 /
    float64 channels_last y, no autocast, a bias-free 1x1 stride-1 conv, a plain
    BatchNorm2d in training, more pixels than output channels, and more than one value
    per output channel."""
    conv, bn, _ = projection
    if not ENABLED or y.device.type != "cpu" or y.dtype not in _DTYPES \
            or torch.is_autocast_enabled("cpu"):
        return False
    if not (bn.training and is_plain_batchnorm(bn)) or conv.bias is not None \
            or is_same_conv(conv) or conv.weight.dtype != y.dtype:
        return False
    n, _, h, w = y.shape
    return (gemm_conv_layout(y, conv.weight, conv.stride, conv.padding, conv.groups)
            and h * w >= 2 * conv.out_channels and n * h * w > 1)


def se_projection_train(y: Tensor, sums: Tensor, se: tuple, projection: tuple) -> Tensor:
    """act(BN(conv1x1(y * gate))) with gate the SE of y (from its pooled sums), for
    (conv_reduce, conv_expand, act) and (conv, bn, act); BatchNorm2d's bookkeeping
    (running statistics, num_batches_tracked). Callers check train_tail_applies first."""
    reduce, expand, se_act = se
    conv, bn, act = projection
    args = bn_call_args(bn)
    running = running_stats(args["running_mean"], args["running_var"], args["momentum"])
    return SEProjectionTrain.apply(
        y, sums, reduce.weight, bias_or_zeros(reduce.bias, reduce.weight), expand.weight,
        bias_or_zeros(expand.bias, expand.weight), conv.weight,
        bn.weight, bn.bias, act_code(se_act), args["eps"], act_code(act), running)[0]


def _gated_transposed_product(dp: Tensor, gated_t: Tensor, bias: Tensor) -> Tensor:
    """dp_n @ gated_t[n]^T + bias[n] per sample, channels_last: dp (N, Cout, H, W),
    gated_t (N, C, Cout) contiguous (the per-sample gated weight, transposed), bias (N, C)."""
    n, _, h, w = dp.shape
    c = gated_t.shape[1]
    if epilogue_gemm_serves(dp):
        return ext_module().cpu.pw_conv_act(dp, gated_t, bias, 0)
    out = torch.empty((n, c, h, w), dtype=dp.dtype, memory_format=torch.channels_last)
    torch.baddbmm(bias.to(dp.dtype).unsqueeze(1), sample_rows(dp),
                  gated_t.to(dp.dtype).transpose(1, 2), out=sample_rows(out))
    return out


def gated_projection_forward(y, gate, weight, gamma, beta, eps, act):
    """(out, bn mean, bn var, p): p = conv1x1(y * gate[n, c]) as per-sample GEMMs with the
    gate in the weights, out = act(batch_norm(p)) with batch statistics."""
    p = gemm_conv1x1_act(y, weight, None, "identity", gate)
    out, bn_mean, bn_var = bn_act_forward(p, gamma, beta, eps, act, overwrite_y=False)
    return out, bn_mean, bn_var, p


def _per_sample_weight_grads(dp: Tensor, y: Tensor) -> Tensor:
    """M_n = dp_n^T @ y_n, (N, Cout, C). float32 batches of at least two samples per
    thread take the extension's products (one sample per task, on the GEMM policy's
    route; B0's tails at batch 8 on AMD EPYC, 2 threads: 0.19-0.55 ms against torch.bmm's
    0.34-1.19, x1.8-x2.5); fewer samples would leave threads idle."""
    if epilogue_gemm_serves(y) and dp.dtype == torch.float32 \
            and y.shape[0] >= 2 * torch.get_num_threads():
        cl = torch.channels_last
        return ext_module().cpu.pw_weight_grad_per_sample(dp.contiguous(memory_format=cl),
                                                          y.contiguous(memory_format=cl))
    return torch.bmm(sample_rows(dp).transpose(1, 2), sample_rows(y))


def gated_projection_grads(dout, y, gate, weight, gamma, beta, bn_mean, bn_var, p, eps, act):
    """(dp, dgate, dweight, dgamma, dbeta) of gated_projection_forward for the gradient
    dout of out; dgamma / dbeta in the accumulation dtype, dweight in weight's."""
    dp, dgamma, sum_g = bn_act_backward(dout, p, gamma, beta, bn_mean, bn_var, eps, act)
    w2d = as_dtype(weight.flatten(1), gate.dtype)
    m = as_dtype(_per_sample_weight_grads(dp, y), gate.dtype)
    dgate = (m * w2d).sum(1)
    dweight = m.mul_(gate.unsqueeze(1)).sum(0)
    return dp, dgate, as_dtype(dweight, weight.dtype).view_as(weight), dgamma, sum_g


def gated_input_grad(dp: Tensor, gate: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """dp_n @ (W * gate[n]) + bias[n] per sample: dL/dy through the gated conv, plus bias
    (N, C) (what each pixel gets through the SE's pooled mean, or zeros)."""
    # W^T made contiguous once (Cout * C values), then (W * gate[n])^T written straight
    # into a contiguous (N, C, Cout) buffer: the product's inner loop runs along Cout in
    # both operands (broadcasting the strided W^T took x2.5 as long on B0's 80 x 480
    # tails: 0.32 vs 0.13 ms, N = 8, 2 threads); the values are the same products.
    w_t = as_dtype(weight.flatten(1), gate.dtype).t().contiguous()
    gated_t = gate.new_empty((gate.shape[0], w_t.shape[0], w_t.shape[1]))
    torch.mul(w_t.unsqueeze(0), gate.unsqueeze(2), out=gated_t)
    return _gated_transposed_product(dp, gated_t, bias)


class SEProjectionTrain(torch.autograd.Function):
    """Outputs (out, bn mean, bn var). `running` is (running_mean, running_var, momentum)
    or None, updated inside forward (see nn/pointwise.py's ConvBNActTrain)."""

    @staticmethod
    def forward(ctx, y, sums, rw, rb, ew, eb, weight, gamma, beta, se_act, eps, act, running):
        remember_backend(ctx)
        mean = sums / (y.shape[2] * y.shape[3])
        h, gate = excite_mlp(mean, rw, rb, ew, eb, se_act)
        out, bn_mean, bn_var, p = gated_projection_forward(y, gate, weight, gamma, beta, eps,
                                                           act)
        update_running(vector_math(select(DEPTHWISE_OP, out)), running, bn_mean, bn_var,
                       out.numel() // out.shape[1])
        ctx.save_for_backward(y, mean, h, gate, rw, rb, ew, eb, weight, gamma, beta, bn_mean,
                              bn_var, p)
        ctx.se_act, ctx.eps, ctx.act = se_act, eps, act
        ctx.mark_non_differentiable(bn_mean, bn_var)
        return out, bn_mean, bn_var

    @staticmethod
    @runs_forward_backend
    @once_differentiable  # the primitives record no graph: double backward raises
    def backward(ctx, dout, _dmean, _dvar):
        y, mean, h, gate, rw, rb, ew, eb, weight, gamma, beta, bn_mean, bn_var, p = \
            ctx.saved_tensors
        dp, dgate, dweight, dgamma, sum_g = gated_projection_grads(
            dout, y, gate, weight, gamma, beta, bn_mean, bn_var, p, ctx.eps, ctx.act)
        dmean, drw, drb, dew, deb = mlp_backward(dgate, mean, h, gate, rw, rb, ew, eb,
                                                 ctx.se_act, y.shape[2] * y.shape[3])
        dy = gated_input_grad(dp, gate, weight, dmean)
        return (dy, None, drw, drb, dew, deb, dweight,
                *bn_param_grads(ctx, gamma, beta, dgamma, sum_g, 7), None, None, None, None)
