"""Triton backend of the fused depthwise conv + BatchNorm + activation op.

Math, per channel c, with y = depthwise_conv(x, w), z = y * scale + shift, M = N * OH * OW:
  dw_stats            mean = sum(y) / M, var = sum((y - mean)^2) / M   (two-pass moments per
                      pixel tile, Chan's merges of tiles and chunks in float64)
  dw_forward          out = act(z)
  dw_backward_reduce  g = dy * act'(z);  sum_g = sum(g),  sum_g_yc = sum(g * (y - mean))
  dw_backward         dyc = scale * g + coef_b + coef_c * (y - mean)          (grad of y)
                      dx[n,c,i,j] = sum_{kh,kw} w[c,kh,kw] * dyc[n,c,(i+pt-kh)/s,(j+pl-kw)/s]
                      dw[c,kh,kw] = sum_{n,oh,ow} dyc[n,c,oh,ow] * x[n,c,oh*s-pt+kh,ow*s-pl+kw]
Pixels outside [0,H) x [0,W) read as zero; bottom/right padding follows from (OH, OW).

Memory layout: every 4-D tensor is addressed through its (N, C, H, W) element strides, so one
kernel serves NCHW and channels_last. A program owns BLOCK_P flattened pixels x BLOCK_C
channels; in channels_last the channel axis is contiguous (stride 1, which Triton specializes),
so tile loads are vectorized along C. Strides are multiplied in int64 (tensors may exceed 2^31
elements); flattened pixel indices (M < 2^31) stay int32.
Reductions write per-program partials that torch merges in a fixed order (deterministic, no
atomics): stats and backward reduce one row per chunk of `chunk` pixels; dweight one row per
BLOCK_P-pixel tile of the dyc kernel (BLOCK_P fixed by the launcher, _DW_TILE_P).
dx is a gather over taps from a float32/float64 dyc temporary written by the dyc kernel.
Accumulation dtype = element type of the float32/float64 parameter or partials buffer (the
stats kernel takes it as ACC: its partials are float64 for every dtype), i.e. float64 for
float64 inputs and float32 for every other dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.geometry import acc_dtype, dense, memory_format_of

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# fmt: off
# (kernel signatures keep related scalar arguments on one line; one-per-line would double the file)


def _configs(fixed_p=False):
    """Autotune configs; with fixed_p the launcher passes BLOCK_P (it sizes a partials buffer)."""
    # Interpreter: one small config so tests stay fast; pixel and channel masks still bite.
    if _INTERPRET:
        return [triton.Config({"BLOCK_C": 16} if fixed_p else {"BLOCK_P": 64, "BLOCK_C": 16})]
    # GPU: ~8 accumulator elements per thread. ptxas (sm_90, bf16 x, 1024-element tiles) reports
    # no spills: forward 96 regs (k=3) / 136 (k=7), dyc 255 (k=7), dx 237 (k=7). Before the kh
    # loops became runtime loops, fully unrolled taps spilled (forward k=7: 952 B stack).
    # Wide-C tiles suit channels_last, tall narrow ones NCHW / small C. Not yet timed on a GPU.
    # EFFNET_KERNELS_TRITON_AUTOTUNE=0 keeps the first config only (GPU test runs: every new
    # shape key would otherwise compile and time all of them).
    if fixed_p:  # BLOCK_P = _DW_TILE_P = 128
        configs = [triton.Config({"BLOCK_C": c}, num_warps=w) for c, w in [(8, 4), (16, 8)]]
    else:
        tiles = [(32, 32, 4), (64, 16, 4), (128, 8, 4), (32, 64, 8), (64, 32, 8)]
        configs = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w) for p, c, w in tiles]
    return configs[:1] if os.environ.get("EFFNET_KERNELS_TRITON_AUTOTUNE") == "0" else configs


_KEY = ["M", "C", "K", "STRIDE"]


@triton.jit
def _pixel(p, W, HW):
    """Flattened pixel index p -> (n, h, w) for an image of HW = H * W pixels."""
    n = p // HW
    r = p - n * HW
    h = r // W
    return n, h, r - h * W


@triton.jit
def _chan(ptr, c, cmask):
    """Per-channel parameter row [1, BLOCK_C]; 0 in masked lanes."""
    return tl.load(ptr + c, mask=cmask, other=0.0)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:  # NaN passes through relu and relu6, as in PyTorch
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 3:
        z = tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))
    return z


@triton.jit
def _act_backward(dy, z, ACT: tl.constexpr):
    """dy * act'(z)."""
    if ACT == 1:
        dy = tl.where(z <= 0, 0.0, dy)
    elif ACT == 2:
        s = 1.0 / (1.0 + tl.exp(-z))
        dy = dy * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 3:
        dy = tl.where((z <= 0) | (z >= 6.0), 0.0, dy)
    return dy


@triton.jit
def _conv_tile(x_ptr, w_ptr, n, oh, ow, c, pmask, cmask, H, W, pad_top, pad_left,
               sxn, sxc, sxh, sxw, ACC: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y tile [BLOCK_P, BLOCK_C] at pixels (n, oh, ow) [BLOCK_P, 1], channels c [1, BLOCK_C]."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    ih0 = oh * STRIDE - pad_top
    iw0 = ow * STRIDE - pad_left
    # Pointer of tap (0, 0); tap (kh, kw) adds the scalar kh * sxh + kw * sxw.
    x0 = (x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc + ih0.to(tl.int64) * sxh
          + iw0.to(tl.int64) * sxw)
    w0 = w_ptr + c * (K * K)
    for kh in range(K):  # runtime loop: bounds register live ranges (k=7)
        ih = ih0 + kh
        hmask = pmask & cmask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(K):
            iw = iw0 + kw
            xv = tl.load(x0 + (kh * sxh + kw * sxw), mask=hmask & (iw >= 0) & (iw < W), other=0.0)
            wv = tl.load(w0 + (kh * K + kw), mask=cmask, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)
    return acc


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def _dw_stats_kernel(
    x_ptr,     # (N, C, H, W) strided, any float dtype
    w_ptr,     # (C, K*K) contiguous
    part_ptr,  # (rows, 2, C) float64: per-chunk mean, M2
    M, C, H, W, OW, OHW, chunk, pad_top, pad_left, sxn, sxc, sxh, sxw,
    K: tl.constexpr, STRIDE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Two passes per sub-tile, in registers: its float mean t, then the sums of y - t (the
    # deviation d = y - t keeps its digits however large the mean), giving the tile's mean
    # t + sum(d) / n and M2 sum(d^2) - sum(d)^2 / n in float64, merged over the chunk's
    # tiles with Chan's formula in float64. A float mean alone would be rounded to
    # ulp(mean) and enter M2 through the merges' cross terms. dw_stats merges the chunks.
    row = tl.program_id(0)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c, cmask = cc[None, :], cc[None, :] < C
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for s in range(0, chunk, BLOCK_P):
        local = s + tl.arange(0, BLOCK_P)[:, None]
        p = row * chunk + local
        pmask = (local < chunk) & (p < M)
        n, oh, ow = _pixel(p, OW, OHW)
        y = _conv_tile(x_ptr, w_ptr, n, oh, ow, c, pmask, cmask, H, W, pad_top, pad_left,
                       sxn, sxc, sxh, sxw, ACC, K, STRIDE, BLOCK_P, BLOCK_C)
        nb = tl.sum(pmask.to(ACC), axis=0)
        t = tl.sum(tl.where(pmask, y, 0.0), axis=0) / tl.maximum(nb, 1.0)
        d = tl.where(pmask, y - t[None, :], 0.0)
        dev = tl.sum(d, axis=0).to(tl.float64)
        nb64 = nb.to(tl.float64)
        nb_div = tl.maximum(nb64, 1.0)
        tile_mean = t.to(tl.float64) + dev / nb_div
        tile_m2 = tl.maximum(tl.sum(d * d, axis=0).to(tl.float64) - dev * dev / nb_div, 0.0)
        total = n_acc + nb64
        delta = tile_mean - mean
        frac = nb64 / tl.maximum(total, 1.0)  # 0 for an empty tile
        mean += delta * frac
        m2 += tile_m2 + delta * delta * n_acc * frac
        n_acc = total
    out = part_ptr + row.to(tl.int64) * 2 * C + cc
    tl.store(out, mean, mask=cc < C)
    tl.store(out + C, m2, mask=cc < C)


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def _dw_forward_kernel(
    x_ptr,      # (N, C, H, W) strided
    w_ptr,      # (C, K*K) contiguous
    scale_ptr,  # (C,) acc dtype
    shift_ptr,  # (C,) acc dtype
    out_ptr,    # (N, C, OH, OW) strided, x's dtype
    M, C, H, W, OW, OHW, pad_top, pad_left, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    K: tl.constexpr, STRIDE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    pmask, cmask = p < M, c < C
    n, oh, ow = _pixel(p, OW, OHW)
    y = _conv_tile(x_ptr, w_ptr, n, oh, ow, c, pmask, cmask, H, W, pad_top, pad_left,
                   sxn, sxc, sxh, sxw, ACC, K, STRIDE, BLOCK_P, BLOCK_C)
    z = y * _chan(scale_ptr, c, cmask) + _chan(shift_ptr, c, cmask)
    off = (n.to(tl.int64) * syn + c.to(tl.int64) * syc + oh.to(tl.int64) * syh
           + ow.to(tl.int64) * syw)
    tl.store(out_ptr + off, _act(z, ACT).to(out_ptr.dtype.element_ty), mask=pmask & cmask)


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def _dw_backward_reduce_kernel(
    dy_ptr,     # (N, C, OH, OW) strided
    x_ptr,      # (N, C, H, W) strided
    w_ptr,      # (C, K*K) contiguous
    scale_ptr, shift_ptr, mean_ptr,  # (C,) acc dtype
    part_ptr,   # (rows, 2, C) acc dtype: per-chunk sum_g, sum_g_yc
    M, C, H, W, OW, OHW, chunk, pad_top, pad_left,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    K: tl.constexpr, STRIDE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    row = tl.program_id(0)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c, cmask = cc[None, :], cc[None, :] < C
    scale = _chan(scale_ptr, c, cmask)
    shift = _chan(shift_ptr, c, cmask)
    mu = _chan(mean_ptr, c, cmask)
    sum_g = tl.zeros([BLOCK_C], dtype=ACC)
    sum_gy = tl.zeros([BLOCK_C], dtype=ACC)
    for s in range(0, chunk, BLOCK_P):
        local = s + tl.arange(0, BLOCK_P)[:, None]
        p = row * chunk + local
        pmask = (local < chunk) & (p < M)
        n, oh, ow = _pixel(p, OW, OHW)
        y = _conv_tile(x_ptr, w_ptr, n, oh, ow, c, pmask, cmask, H, W, pad_top, pad_left,
                       sxn, sxc, sxh, sxw, ACC, K, STRIDE, BLOCK_P, BLOCK_C)
        off = (n.to(tl.int64) * sdn + c.to(tl.int64) * sdc + oh.to(tl.int64) * sdh
               + ow.to(tl.int64) * sdw)
        dy = tl.load(dy_ptr + off, mask=pmask & cmask, other=0.0).to(ACC)
        g = _act_backward(dy, y * scale + shift, ACT)  # zero wherever masked (dy = 0)
        sum_g += tl.sum(g, axis=0)
        sum_gy += tl.sum(g * (y - mu), axis=0)
    out = part_ptr + row.to(tl.int64) * 2 * C + cc
    tl.store(out, sum_g, mask=cc < C)
    tl.store(out + C, sum_gy, mask=cc < C)


@triton.autotune(configs=_configs(fixed_p=True), key=_KEY)
@triton.jit
def _dw_dyc_kernel(
    dy_ptr,     # (N, C, OH, OW) strided
    x_ptr,      # (N, C, H, W) strided
    w_ptr,      # (C, K*K) contiguous
    scale_ptr, shift_ptr, mean_ptr, cb_ptr, cc_ptr,  # (C,) acc dtype
    dyc_ptr,    # (N, C, OH, OW) acc dtype, same strides as dy
    part_ptr,   # (cdiv(M, BLOCK_P), K*K, C) acc dtype: per-tile dweight partials
    M, C, H, W, OW, OHW, pad_top, pad_left, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    K: tl.constexpr, STRIDE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # BLOCK_P is fixed by the launcher (it sizes the partials); only BLOCK_C is tuned.
    ACC: tl.constexpr = dyc_ptr.dtype.element_ty
    tile = tl.program_id(0)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = cc[None, :]
    pmask, cmask = p < M, c < C
    n, oh, ow = _pixel(p, OW, OHW)
    y = _conv_tile(x_ptr, w_ptr, n, oh, ow, c, pmask, cmask, H, W, pad_top, pad_left,
                   sxn, sxc, sxh, sxw, ACC, K, STRIDE, BLOCK_P, BLOCK_C)
    scale = _chan(scale_ptr, c, cmask)
    off = (n.to(tl.int64) * sdn + c.to(tl.int64) * sdc + oh.to(tl.int64) * sdh
           + ow.to(tl.int64) * sdw)
    dy = tl.load(dy_ptr + off, mask=pmask & cmask, other=0.0).to(ACC)
    g = _act_backward(dy, y * scale + _chan(shift_ptr, c, cmask), ACT)
    yc = y - _chan(mean_ptr, c, cmask)
    dyc = scale * g + _chan(cb_ptr, c, cmask) + _chan(cc_ptr, c, cmask) * yc
    tl.store(dyc_ptr + off, dyc, mask=pmask & cmask)
    # dweight partials: second pass over the taps (x re-reads hit cache), dyc stays in registers;
    # x is loaded as 0 outside the tile, so masked lanes add nothing.
    base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    part = part_ptr + tile.to(tl.int64) * (K * K) * C + cc
    for kh in range(K):  # runtime loop: bounds register live ranges (k=7)
        ih = oh * STRIDE - pad_top + kh
        hmask = pmask & cmask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(K):
            iw = ow * STRIDE - pad_left + kw
            m = hmask & (iw >= 0) & (iw < W)
            xv = tl.load(base + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw, mask=m, other=0.0)
            tl.store(part + (kh * K + kw) * C, tl.sum(dyc * xv.to(ACC), axis=0), mask=cc < C)


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def _dw_dx_kernel(
    dyc_ptr,  # (N, C, OH, OW) acc dtype, strided
    w_ptr,    # (C, K*K) contiguous
    dx_ptr,   # (N, C, H, W) strided, x's dtype
    M, C, W, HW, OH, OW, pad_top, pad_left, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Gather: input pixel (ih, iw) receives tap (kh, kw) from output pixel
    # ((ih + pad_top - kh) / STRIDE, (iw + pad_left - kw) / STRIDE) when that divides exactly.
    ACC: tl.constexpr = dyc_ptr.dtype.element_ty
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]  # M = N * H * W here
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    pmask, cmask = p < M, c < C
    n, ih, iw = _pixel(p, W, HW)
    base = dyc_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for kh in range(K):  # runtime loop: bounds register live ranges (k=7)
        th = ih + pad_top - kh
        oh = th // STRIDE
        hmask = pmask & cmask & (th >= 0) & (oh < OH)
        if STRIDE > 1:
            hmask = hmask & (th % STRIDE == 0)
        for kw in tl.static_range(K):
            tw = iw + pad_left - kw
            ow = tw // STRIDE
            m = hmask & (tw >= 0) & (ow < OW)
            if STRIDE > 1:
                m = m & (tw % STRIDE == 0)
            g = tl.load(base + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw, mask=m, other=0.0)
            wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw), mask=cmask, other=0.0)
            acc += g * wv.to(ACC)
    off = (n.to(tl.int64) * sxn + c.to(tl.int64) * sxc + ih.to(tl.int64) * sxh
           + iw.to(tl.int64) * sxw)
    tl.store(dx_ptr + off, acc.to(dx_ptr.dtype.element_ty), mask=pmask & cmask)


# ----------------------------------------------------------------------------- launchers


# Pixels per dweight partial row (GPU: 128 keeps (rows, K*K, C) partials <= 0.4x of y for k=7).
_DW_TILE_P = 64 if _INTERPRET else 128


def _chunk(m: int) -> int:
    """Pixels per stats partial row: ~1024 rows on GPU (a multiple of every BLOCK_P config)."""
    if _INTERPRET:
        return 128
    return min(4096, max(128, triton.next_power_of_2(triton.cdiv(m, 1024))))


def _prepare(x, weight, *vecs):
    """Dense x, weight as (C, K*K), per-channel vectors in the accumulation dtype."""
    x = dense(x)
    acc = acc_dtype(x.dtype)
    w = weight.reshape(weight.shape[0], -1).contiguous()
    return (x, w, acc, weight.shape[-1]) + tuple(v.to(device=x.device, dtype=acc).contiguous()
                                                for v in vecs)


def _grid_rows(rows, c):
    return lambda meta: (rows, triton.cdiv(c, meta["BLOCK_C"]))


def _grid_tiles(m, c):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))


def dw_stats(x, weight, stride, pad_top, pad_left, out_h, out_w):
    """Per-channel (mean, biased var) of y = depthwise_conv(x, weight)."""
    x, w, acc, k = _prepare(x, weight)
    n, c, h, wd = x.shape
    m = n * out_h * out_w
    chunk = _chunk(m)
    rows = triton.cdiv(m, chunk)
    part = torch.empty((rows, 2, c), dtype=torch.float64, device=x.device)
    _dw_stats_kernel[_grid_rows(rows, c)](
        x, w, part, m, c, h, wd, out_w, out_h * out_w, chunk, pad_top, pad_left, *x.stride(),
        K=k, STRIDE=stride, ACC=tl.float64 if acc == torch.float64 else tl.float32,
    )
    # Chan's merge of the chunks (mean_r, M2_r) in float64:
    # M2 = sum(M2_r) + sum(n_r * (mean_r - mean)^2).
    cnt = (m - chunk * torch.arange(rows, device=x.device, dtype=torch.float64)).clamp(max=chunk)
    mean_r, m2_r = part[:, 0], part[:, 1]
    mean = (cnt[:, None] * mean_r).sum(0) / m
    m2 = m2_r.sum(0) + (cnt[:, None] * (mean_r - mean).square()).sum(0)
    return mean.to(acc), (m2 / m).to(acc)


def dw_forward(x, weight, scale, shift, stride, pad_top, pad_left, out_h, out_w, act):
    """act(depthwise_conv(x, weight) * scale + shift) in x's dtype and memory format."""
    x, w, acc, k, scale, shift = _prepare(x, weight, scale, shift)
    n, c, h, wd = x.shape
    out = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device,
                      memory_format=memory_format_of(x))
    m = n * out_h * out_w
    _dw_forward_kernel[_grid_tiles(m, c)](
        x, w, scale, shift, out, m, c, h, wd, out_w, out_h * out_w, pad_top, pad_left,
        *x.stride(), *out.stride(), K=k, STRIDE=stride, ACT=act,
    )
    return out


def dw_backward_reduce(dy, x, weight, scale, shift, mean, stride, pad_top, pad_left, act):
    """Per-channel (sum(g), sum(g * (y - mean))) with g = dy * act'(y * scale + shift)."""
    x, w, acc, k, scale, shift, mean = _prepare(x, weight, scale, shift, mean)
    dy = dy.contiguous(memory_format=memory_format_of(x))
    n, c, h, wd = x.shape
    out_h, out_w = dy.shape[2:]
    m = n * out_h * out_w
    chunk = _chunk(m)
    rows = triton.cdiv(m, chunk)
    part = torch.empty((rows, 2, c), dtype=acc, device=x.device)
    _dw_backward_reduce_kernel[_grid_rows(rows, c)](
        dy, x, w, scale, shift, mean, part, m, c, h, wd, out_w, out_h * out_w, chunk,
        pad_top, pad_left, *x.stride(), *dy.stride(), K=k, STRIDE=stride, ACT=act,
    )
    sums = part.sum(0)
    return sums[0], sums[1]


def dw_backward(dy, x, weight, scale, shift, mean, coef_b, coef_c, stride, pad_top, pad_left,
                act):
    """(dx, dweight) for the grad of y, dyc = scale * g + coef_b + coef_c * (y - mean)."""
    x, w, acc, k, scale, shift, mean, cb, cc = _prepare(
        x, weight, scale, shift, mean, coef_b, coef_c)
    dy = dy.contiguous(memory_format=memory_format_of(x))
    n, c, h, wd = x.shape
    out_h, out_w = dy.shape[2:]
    m = n * out_h * out_w
    geo = (pad_top, pad_left)
    dyc = torch.empty_like(dy, dtype=acc)  # same strides as dy
    part = torch.empty((triton.cdiv(m, _DW_TILE_P), k * k, c), dtype=acc, device=x.device)
    _dw_dyc_kernel[_grid_rows(part.shape[0], c)](
        dy, x, w, scale, shift, mean, cb, cc, dyc, part, m, c, h, wd, out_w, out_h * out_w, *geo,
        *x.stride(), *dy.stride(), K=k, STRIDE=stride, ACT=act, BLOCK_P=_DW_TILE_P,
    )
    dx = torch.empty_like(x, memory_format=memory_format_of(x))
    _dw_dx_kernel[_grid_tiles(n * h * wd, c)](
        dyc, w, dx, n * h * wd, c, wd, h * wd, out_h, out_w, *geo, *dyc.stride(), *dx.stride(),
        K=k, STRIDE=stride,
    )
    dweight = part.sum(0).t().reshape(weight.shape)
    return dx, dweight.to(weight.dtype)
# fmt: on
