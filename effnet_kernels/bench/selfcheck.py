"""Quick parity self-check: every usable backend of every op against the reference truth.

Small shapes (odd sizes, stride 2, TensorFlow SAME padding, channels_last), in the
benchmark's dtype (float32 by default), train and eval; the output, every input gradient
and (depthwise, train) the updated running statistics are compared with
`effnet_kernels.testing.parity`: the error against a float64 run of the truth must stay
within a few times PyTorch's own error in that dtype plus a floor. A backend that cannot
serve the dtype on the device is left out; a broken one is reported, never raised, so the
benchmark still runs.
"""

from __future__ import annotations

import torch

from .. import functional
from ..backends import BACKENDS, not_supported_reasons, use_backend
from ..ops import reference
from ..testing import parity
from .providers import DROP_P, OP_NAMES

# (name, N, C, H, W, kernel, stride, padding, memory format)
DW_CASES = [
    ("n2c8h9k3s1", 2, 8, 9, 9, 3, 1, None, "nchw"),
    ("n2c6h10k5s2", 2, 6, 10, 10, 5, 2, None, "nchw"),
    ("n3c5h9k3s2same", 3, 5, 9, 11, 3, 2, "same", "channels_last"),
]
# (name, N, C, H, W, reduced, memory format)
ACT_CASES = [("n2c16h7r4", 2, 16, 7, 7, 4, "nchw"), ("n3c12h5r3", 3, 12, 5, 6, 3, "channels_last")]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _depthwise(case, device):
    name, n, c, h, w, k, stride, padding, fmt = case
    gen = torch.Generator().manual_seed(1)
    tensors = [
        torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=FORMATS[fmt]),
        torch.randn(c, 1, k, k, generator=gen) * 0.3,
        torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.1,
        torch.randn(c, generator=gen) * 0.1, torch.rand(c, generator=gen) + 0.5,
    ]
    names = ["x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var"]

    def call(op, training):
        def fn(x, wt, g, b, rm, rv):
            return op(x, wt, g, b, rm, rv, stride=stride, padding=padding, training=training,
                      momentum=0.1, eps=1e-5, act="silu")
        return fn
    return name, fmt, [t.to(device) for t in tensors], names, 4, call, (
        functional.depthwise_conv_bn_act, reference.depthwise_conv_bn_act)


def _squeeze_excite(case, device):
    name, n, c, h, w, r, fmt = case
    gen = torch.Generator().manual_seed(2)
    tensors = [
        torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=FORMATS[fmt]),
        torch.randn(r, c, 1, 1, generator=gen) * 0.3, torch.randn(r, generator=gen) * 0.1,
        torch.randn(c, r, 1, 1, generator=gen) * 0.3, torch.randn(c, generator=gen) * 0.1,
    ]
    names = ["x", "reduce_weight", "reduce_bias", "expand_weight", "expand_bias"]

    def call(op, _training):
        return lambda *ts: op(*ts, act="silu")
    return name, fmt, [t.to(device) for t in tensors], names, 5, call, (
        getattr(functional, "squeeze_excite", None), getattr(reference, "squeeze_excite", None))


def _drop_connect(case, device):
    name, n, c, h, w, _, fmt = case
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=FORMATS[fmt])
               for _ in range(2)]

    def call(op, training):
        def fn(x, shortcut):
            # the same seed for fused and truth: both draw the float32 mask the same way
            g = torch.Generator(device=x.device).manual_seed(7)
            return op(x, shortcut, DROP_P, training=training, generator=g)
        return fn
    return name, fmt, [t.to(device) for t in tensors], ["x", "shortcut"], 2, call, (
        getattr(functional, "drop_connect_add", None), getattr(reference, "drop_connect_add", None))


BUILDERS = {"depthwise": (_depthwise, DW_CASES), "squeeze_excite": (_squeeze_excite, ACT_CASES),
            "drop_connect": (_drop_connect, ACT_CASES)}


def _run(fn, tensors, names, n_diff, training, dtype):
    """{result name: tensor}: output, gradients (train) and every mutated input."""
    ts = [t.detach().clone().to(dtype) for t in tensors]
    for t in ts[:n_diff]:
        t.requires_grad_(training)
    out = fn(*ts)
    results = {"out": out.detach()}
    if training:
        gen = torch.Generator().manual_seed(4)
        grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
        grads = torch.autograd.grad(out, ts[:n_diff], grad_out)
        results.update({f"d{nm}": g for nm, g in zip(names[:n_diff], grads, strict=True)})
        results.update({nm: t.detach() for nm, t in zip(names[n_diff:], ts[n_diff:], strict=True)})
    return results


def usable_backends(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    return [b for b in BACKENDS if not not_supported_reasons(OP_NAMES[op][0], b, device, dtype)]


def run_selfcheck(device: torch.device, ops=tuple(BUILDERS), progress=None,
                  dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per (op, backend, case, mode) in dtype: ok, worst tensor, its error and bound."""
    unknown = [op for op in ops if op not in BUILDERS]
    if unknown:
        raise ValueError(f"ops must be among {tuple(BUILDERS)}, got {unknown}")
    rows = []
    for op in ops:
        builder, cases = BUILDERS[op]
        for case in cases:
            name, fmt, tensors, names, n_diff, call, (fused, truth) = builder(case, device)
            if fused is None or truth is None:
                rows.append({"op": op, "backend": "-", "case": name, "mode": "-", "ok": None,
                             "skipped": f"{op} (functional op or reference truth) is not available yet"})
                break
            for training in (True, False):
                mode = "train" if training else "eval"
                expect = _run(call(truth, training), tensors, names, n_diff, training, torch.float64)
                same = _run(call(truth, training), tensors, names, n_diff, training, dtype)
                for backend in usable_backends(op, device, dtype):
                    row = {"op": op, "backend": backend, "case": name, "memory_format": fmt,
                           "mode": mode, "dtype": str(dtype).removeprefix("torch.")}
                    try:
                        with use_backend(backend):
                            got = _run(call(fused, training), tensors, names, n_diff, training,
                                       dtype)
                        checks = [parity(k, got[k], same[k], expect[k], dtype) for k in expect]
                        worst = max(checks, key=lambda p: p.error / p.bound if p.bound else p.error)
                        row.update(ok=all(p.ok for p in checks), worst=worst.name,
                                   max_error=worst.error, bound=worst.bound,
                                   torch_error=worst.torch_error,
                                   failed=[str(p) for p in checks if not p.ok])
                    except Exception as exc:  # noqa: BLE001 - a crash is a failed check
                        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    return rows
