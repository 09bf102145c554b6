"""A fused block's eval forward on CPU as a few compiled calls, with everything that does
not depend on the input prepared once.

    e    = act(x @ W1'^T + b1')              expand conv, BN folded
    y    = act(dwconv(e) * s + t), sums      depthwise, BN as scale/shift, SE pool sums
                                             from the kernel's epilogue (dw_forward_pool);
                                             with e computed per input row inside the
                                             depthwise pass, never stored, where the
                                             expand weight is small (dw_expand_forward),
                                             else by pw_conv_act first
    gate = sigmoid(act(sums/HW @ Wr^T + br) @ We^T + be)          on (N, C), one call
                                             (se_gate_eval)
    out  = act(y_n @ (W2' * gate[n])^T + b2')  projection, BN folded, gate in the packed
                                             weight per sample (pw_conv_act's gate;
                                             on y * gate when H * W < Cout)
    out += x                                 residual (eval: drop-connect is the identity)

The expand and projection weights are packed for the extension's GEMM once, on first use,
and kept with the plan (pack_weight, csrc/cpu/packed_weight.h): packing per call costs
50-200 us per 7x7-stage weight whatever the batch size. The gated projection scales a copy
of its packed weight per sample.

The module route (nn/mbconv.py) computes the same thing with the same primitives, but
every call re-derives the folded weights' memo keys, the BN scale/shift, the checks and
the backend choice per op, and allocates a separate residual sum: measured 0.2-0.4 ms of
host time per block (B0, batch 1) and up to 0.9 ms per block at batch 8. Here the folded
weights, the depthwise scale/shift and the transposed SE matrices are computed once per
block and kept while every source tensor is the same object with the same version
counter (as in nn/eval_fold.py); optimizer steps, running-statistics updates and
load_state_dict change a version, and the plan is rebuilt on the next call.

Applies to eval calls that record no autograd graph, on CPU float32 channels_last input,
with the cpu backend serving the depthwise op (a forced backend keeps the module route)
and every BatchNorm in eval with running statistics. Results are those of the module
route up to the rounding of the squeeze-excite gate, which se_gate_eval computes in its
own loops (csrc/cpu/squeeze_excite.cpp: at batch 8 x 224^2 the ATen ops it replaces
cost about 190 us per block, cold after the depthwise pass); tested against the module
route and against float64.

Traced calls (torch.compile, torch.export; CPU float32 channels_last, no graph recorded)
prepare the same tensors in torch ops inside the graph on every call (the memo above is
eager-only) and run the plan as one custom op per block, effnet_kernels::block_eval, so a
compiled converted model keeps the prepared route (B0 batch 8 x 224^2 under inductor:
65-67 ms before, 52 ms with it; 49-51 ms eagerly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._ext import ext_module
from ..backends import forced_backend, select
from ..ops.activations import act_code
from ..ops.bn_math import bn_affine as composite_bn_affine
from ..ops.bn_math import vector_math
from ..ops.depthwise import KERNEL_SIZES
from ..ops.depthwise import OP as DW_OP
from ..ops.eager import plain_eager, records_graph, traced_cpu_call
from ..ops.geometry import conv_geometry
from .conv_bn_act import is_same_conv
from .eval_fold import clear_folds, fold_conv_bn
from .gemm_conv import clear_packs

# Switch for in-process A/B measurements and the parity tests; the module route is
# always correct.
ENABLED = True
# Switch for in-process A/B measurements and tests: the expand conv runs inside the
# depthwise pass (dw_expand_forward) where its weight has at most FUSED_EXPAND_MAX_WEIGHT
# values. B0 inference at batch 8 x 224^2, one interleaved run: 48.2 ms unfused, 44.9 with
# this bound (every expand up to the 14x14 stage), 45.8 with the 7x7 stage's 192 x 1152
# weights fused as well.
FUSED_EXPAND = True
FUSED_EXPAND_MAX_WEIGHT = 1 << 17


@dataclass(frozen=True)
class _Plan:
    expand: tuple | None      # (weight (Cout, Cin, 1, 1), bias, act code) or None
    dw_weight: Tensor
    dw_scale: Tensor
    dw_shift: Tensor
    dw_stride: int
    dw_padding: int | str
    dw_act: int
    se: tuple | None          # (Wr^T, br, We^T, be, act code) or None
    proj_weight: Tensor       # (Cout, Cin, 1, 1), BN folded
    proj_bias: Tensor
    proj_act: int
    skip: bool
    # "expand" / "proj" -> the weight packed once for the extension's GEMM (pack_weight),
    # made on first use; None: pack per call (plans built per traced call).
    packs: dict | None = None


# block -> (settings, watched sources, plan); entries go with the block.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CONV_BN_SOURCES = (("_parameters", "weight"), ("_parameters", "bias"))
_BN_SOURCES = (("_parameters", "weight"), ("_parameters", "bias"),
               ("_buffers", "running_mean"), ("_buffers", "running_var"))


def _slots(expand, depthwise, se, projection) -> list:
    """(dict, key) of every source tensor, read from the modules' own dicts: per call this
    costs a dict lookup each instead of nn.Module.__getattr__."""
    slots = []
    for part in (expand, depthwise, projection):
        if part is not None:
            slots += [(getattr(part[0], d), k) for d, k in _CONV_BN_SOURCES]
            slots += [(getattr(part[1], d), k) for d, k in _BN_SOURCES]
    if se is not None:
        slots += [(getattr(m, d), k) for m in se[:2] for d, k in _CONV_BN_SOURCES]
    return slots


def _sources(expand, depthwise, se, projection) -> tuple:
    return tuple(d.get(k) for d, k in _slots(expand, depthwise, se, projection))


def _batch_counters(expand, depthwise, projection) -> list:
    """(dict, key) of each norm's num_batches_tracked: PyTorch's BatchNorm updates the
    running statistics without bumping their versions, but bumps this counter's (see
    nn/eval_fold.py), so a plan watches it beside its sources."""
    return [(part[1]._buffers, "num_batches_tracked") for part in (expand, depthwise, projection)
            if part is not None]


def _watch(slots: list) -> tuple | None:
    """(dict, key, tensor, version, data pointer) per slot; None when some tensor is an
    inference tensor (no version counter: nothing to watch)."""
    watched = []
    for d, k in slots:
        t = d.get(k)
        if t is not None and t.is_inference():
            return None
        watched.append((d, k, t, None if t is None else t._version,
                        None if t is None else t.data_ptr()))
    return tuple(watched)


def _unchanged(watched: tuple) -> bool:
    for d, k, t, version, ptr in watched:
        now = d.get(k)
        if now is not t or (t is not None and (t._version != version or t.data_ptr() != ptr)):
            return False
    return True


def _parts_apply(x: Tensor, expand, depthwise, se, projection) -> bool:
    """The per-call conditions of an eager call that do not depend on the prepared
    tensors."""
    if not (type(x) is Tensor and _input_and_norms_fit(x, expand, depthwise, projection)
            and not torch.is_autocast_enabled("cpu") and plain_eager(x)):
        return False
    prims = _cpu_prims()
    return prims is not None and select(DW_OP, x) is prims


def _input_and_norms_fit(x: Tensor, expand, depthwise, projection) -> bool:
    """What every planned call needs (eager or traced): the plan on, CPU float32
    channels_last non-empty 4-D input, every BatchNorm in eval with running statistics."""
    if not (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.numel() > 0 and x.is_contiguous(memory_format=torch.channels_last)):
        return False
    for part in (expand, depthwise, projection):
        if part is not None and (part[1].training or part[1]._buffers.get("running_mean") is None
                                 or part[1]._buffers.get("running_var") is None):
            return False
    return True


@functools.cache
def _cpu_prims():
    """The extension's cpu primitives when they include the epilogue GEMM, else None."""
    ext = ext_module()
    return ext.cpu if ext is not None and ext.cpu.pw_conv_available() else None


def _dw_padding(expand, depthwise, projection) -> tuple[bool, int | str]:
    """(whether the parts are what the plan computes, the depthwise padding: an int or
    "same"): 1x1 stride-1 expand / projection convs, a depthwise conv of a kernel size,
    stride and padding the depthwise kernels take."""
    for part in (expand, projection):
        if part is not None:
            conv = part[0]
            if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 \
                    or conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1):
                return False, 0
    conv = depthwise[0]
    if conv.groups != conv.in_channels or conv.dilation != (1, 1) \
            or len(set(conv.stride)) != 1 or conv.stride[0] not in (1, 2) \
            or len(set(conv.kernel_size)) != 1 or conv.kernel_size[0] not in KERNEL_SIZES:
        return False, 0
    padding = "same" if is_same_conv(conv) else conv.padding
    if padding != "same":
        if isinstance(padding, str) or len(set(padding)) != 1:
            return False, 0
        padding = padding[0]
    return True, padding


def _build(expand, depthwise, se, projection, skip: bool, slots: list,
           bn_affine=None) -> _Plan | None:
    """The prepared tensors, or None when some part is not what the plan computes; slots
    as _slots returns them for these parts. bn_affine: the BN vector function to use (the
    compiled one by default; traced calls pass the composite)."""
    ok, padding = _dw_padding(expand, depthwise, projection)
    if not ok or any(t is not None and t.dtype != torch.float32
                     for t in (d.get(k) for d, k in slots)):
        return None
    conv, bn, act = depthwise
    # Traced calls (bn_affine given) record no graph here (checked by the caller) and
    # keep grad-mode changes out of the traced graph.
    traced = bn_affine is not None
    context = contextlib.nullcontext() if traced else _plain_no_grad()
    bn_affine = bn_affine or vector_math(_cpu_prims()).bn_affine
    with context:
        ones = bn.running_mean.new_ones(conv.in_channels)
        bn_weight = ones if bn.weight is None else bn.weight
        bn_bias = torch.zeros_like(ones) if bn.bias is None else bn.bias
        _, scale, shift = bn_affine(bn.running_mean, bn.running_var, bn_weight, bn_bias, bn.eps)
        folded_expand = None
        if expand is not None:
            folded_expand = (*fold_conv_bn(expand[0], expand[1]), act_code(expand[2]))
        se_mats = None
        if se is not None:
            reduce, excite, se_act = se
            se_mats = (reduce.weight.flatten(1).t().contiguous(), _bias(reduce),
                       excite.weight.flatten(1).t().contiguous(), _bias(excite), act_code(se_act))
        proj_weight, proj_bias = fold_conv_bn(projection[0], projection[1])
        return _Plan(folded_expand, conv.weight.detach(), scale, shift, conv.stride[0], padding,
                     act_code(act), se_mats, proj_weight, proj_bias, act_code(projection[2]), skip,
                     None if traced else {})


@contextlib.contextmanager
def _plain_no_grad():
    """Ordinary tensors even under inference_mode (a later call that records a graph
    through x may save them), no graph through the sources."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _bias(conv: nn.Conv2d) -> Tensor:
    return conv.weight.new_zeros(conv.out_channels) if conv.bias is None else conv.bias.detach()


def clear_eval_cache() -> None:
    """Forget every memoized eval fold and block plan. They are rebuilt on the next eval
    call, as they are after any write that bumps a tensor's version counter; call this
    after writes that do not (in-place ops through `.data`, writes from outside PyTorch
    into the tensors' memory)."""
    _PLANS.clear()
    clear_folds()
    clear_packs()


def _plan_for(block: nn.Module, expand, depthwise, se, projection, skip) -> _Plan | None:
    parts = (expand, depthwise, projection)
    settings = (skip, se[2] if se is not None else None,
                *((p[2], p[1].eps) for p in parts if p is not None))
    entry = _PLANS.get(block)
    if entry is not None and entry[0] == settings and _unchanged(entry[1]):
        return entry[2]
    slots = _slots(expand, depthwise, se, projection)
    plan = _build(expand, depthwise, se, projection, skip, slots)
    watched = _watch(slots + _batch_counters(expand, depthwise, projection))
    if watched is not None:
        _PLANS[block] = (settings, watched, plan)
    elif plan is not None:  # a plan for this call only: packing once would not pay
        plan = dataclasses.replace(plan, packs=None)
    return plan


def eval_block(block: nn.Module, x: Tensor, expand: tuple | None, depthwise: tuple,
               se: tuple | None, projection: tuple, skip: bool) -> Tensor | None:
    """The block's eval output through its plan, or None where the plan does not apply
    (the caller then runs its module route). Parts as in nn/mbconv.py: (conv, bn, act)
    for expand (None: no expansion), depthwise and projection; (conv_reduce, conv_expand,
    act) for SE (None: no SE)."""
    if torch.compiler.is_compiling():
        return _traced_eval_block(x, expand, depthwise, se, projection, skip)
    if not _parts_apply(x, expand, depthwise, se, projection) or (
            torch.is_grad_enabled()  # the sources are gathered only where grad mode is on
            and records_graph(x, *_sources(expand, depthwise, se, projection))):
        return None
    plan = _plan_for(block, expand, depthwise, se, projection, skip)
    if plan is None:
        return None
    if not torch.is_grad_enabled():  # inference: skip the context's 1.5 us
        return _run(plan, x)
    with torch.no_grad():
        return _run(plan, x)


def _fuses_expand(expand_weight: Tensor) -> bool:
    """Whether the expand conv runs inside the depthwise pass (dw_expand_forward): its
    GEMMs cover a few image rows each and repack the weight per call, so only weights of
    at most FUSED_EXPAND_MAX_WEIGHT values take it."""
    return FUSED_EXPAND and expand_weight.shape[0] * expand_weight.shape[1] <= FUSED_EXPAND_MAX_WEIGHT


# Switch for in-process A/B measurements and tests: the plans' weights packed once (True)
# or per call (False).
PACK_WEIGHTS = True


def _packed(plan: _Plan, part: str, weight: Tensor):
    """The plan's `part` weight packed for the GEMM (made once, kept with the plan: the
    plan goes when a source changes), or None for per-call packing."""
    if plan.packs is None or not PACK_WEIGHTS:
        return None
    packed = plan.packs.get(part)
    if packed is None:
        packed = plan.packs[part] = _cpu_prims().pack_weight(weight)
    return packed


def _run(plan: _Plan, x: Tensor) -> Tensor:
    prims = _cpu_prims()
    k = plan.dw_weight.shape[-1]
    geo = conv_geometry(x.shape[2], x.shape[3], k, plan.dw_stride, plan.dw_padding)
    if geo.out_h < 1 or geo.out_w < 1:
        raise ValueError(f"x spatial size {tuple(x.shape[2:])} is too small for kernel size {k}")
    pool = plan.se is not None
    dw_args = (plan.dw_weight, plan.dw_scale, plan.dw_shift, *geo, plan.dw_act)
    expand_packed = None if plan.expand is None else _packed(plan, "expand", plan.expand[0])
    if plan.expand is not None and _fuses_expand(plan.expand[0]):
        y, sums = prims.dw_expand_forward(x, *plan.expand, *dw_args, pool, expand_packed)
    else:
        h = x if plan.expand is None else prims.pw_conv_act(x, *plan.expand, expand_packed)
        y, sums = prims.dw_forward_pool(h, *dw_args) if pool else (prims.dw_forward(h, *dw_args),
                                                                   None)
        y = y.contiguous(memory_format=torch.channels_last)
    weight, bias = plan.proj_weight, plan.proj_bias
    if plan.se is None:
        out = prims.pw_conv_act(y, weight, bias, plan.proj_act, _packed(plan, "proj", weight))
    else:
        count = geo.out_h * geo.out_w
        gate = prims.se_gate_eval(sums, count, *plan.se)
        packed = _packed(plan, "proj", weight)
        if count >= weight.shape[0]:  # the gate goes into per-sample weights
            out = prims.pw_conv_act(y, weight, bias, plan.proj_act, packed, gate)
        else:  # late small stages: per-sample weights would outweigh the activation
            out = prims.pw_conv_act(prims.se_scale(y, gate), weight, bias, plan.proj_act,
                                    packed)
    if plan.skip:
        out.add_(x)  # out is this call's own buffer
    return out


# Switch for in-process A/B measurements and tests: traced eval calls run the plan as the
# block_eval custom op (True) or the module route's ops (False).
TRACED_OP = True


@torch.compiler.assume_constant_result
def _cpu_plan_built() -> bool:
    """Whether _cpu_prims() serves (a torch.compile constant: traced checks do not trace
    the extension import)."""
    return _cpu_prims() is not None


def _traced_eval_block(x: Tensor, expand, depthwise, se, projection, skip) -> Tensor | None:
    """eval_block for a traced call (torch.compile, export; not the ONNX exporter): the
    plan's tensors prepared in torch ops (in the graph), its run as the block_eval custom
    op; None where the eager plan would not apply either."""
    if not (TRACED_OP and traced_cpu_call(x) and _cpu_plan_built()
            and forced_backend() in ("auto", "cpu")
            and _input_and_norms_fit(x, expand, depthwise, projection)) \
            or records_graph(x, *_sources(expand, depthwise, se, projection)):
        return None
    plan = _build(expand, depthwise, se, projection, skip,
                  _slots(expand, depthwise, se, projection), bn_affine=composite_bn_affine)
    if plan is None:
        return None
    expand_args = (None, None, 0) if plan.expand is None else plan.expand
    se_args = (None, None, None, None, 0) if plan.se is None else plan.se
    padding = -1 if plan.dw_padding == "same" else plan.dw_padding
    return block_eval(x, expand_args[0], expand_args[1], plan.dw_weight, plan.dw_scale,
                      plan.dw_shift, *se_args[:4], plan.proj_weight, plan.proj_bias,
                      [expand_args[2], plan.dw_act, se_args[4], plan.proj_act],
                      plan.dw_stride, padding, skip)


@torch.library.custom_op("effnet_kernels::block_eval", mutates_args=())
def block_eval(x: Tensor, expand_weight: Tensor | None, expand_bias: Tensor | None,
               dw_weight: Tensor, dw_scale: Tensor, dw_shift: Tensor,
               se_reduce_t: Tensor | None, se_reduce_bias: Tensor | None,
               se_expand_t: Tensor | None, se_expand_bias: Tensor | None,
               proj_weight: Tensor, proj_bias: Tensor, acts: list[int], dw_stride: int,
               dw_padding: int, skip: bool) -> Tensor:
    """A block's eval forward through a plan given as tensors (_run): acts are the
    (expand, depthwise, SE, projection) act codes, dw_padding -1 for TF "same"."""
    plan = _Plan(
        None if expand_weight is None else (expand_weight, expand_bias, acts[0]),
        dw_weight, dw_scale, dw_shift, dw_stride, "same" if dw_padding < 0 else dw_padding,
        acts[1],
        None if se_reduce_t is None else (se_reduce_t, se_reduce_bias, se_expand_t,
                                          se_expand_bias, acts[2]),
        proj_weight, proj_bias, acts[3], skip)
    return _run(plan, x.contiguous(memory_format=torch.channels_last))


@block_eval.register_fake
def _(x, expand_weight, expand_bias, dw_weight, dw_scale, dw_shift, se_reduce_t,
      se_reduce_bias, se_expand_t, se_expand_bias, proj_weight, proj_bias, acts, dw_stride,
      dw_padding, skip):
    geo = conv_geometry(x.shape[2], x.shape[3], dw_weight.shape[-1], dw_stride,
                        "same" if dw_padding < 0 else dw_padding)
    return torch.empty((x.shape[0], proj_weight.shape[0], geo.out_h, geo.out_w),
                       dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
