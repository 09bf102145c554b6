"""Benchmark report: stdout tables, one JSON with every measurement, markdown, PNG plots.

Speedups are time(baseline) / time(provider): x2.41 means 2.41 times faster than the
baseline (eager PyTorch or torch.compile) on the same case. GB/s uses the op's minimal
bytes moved (providers.bytes_moved), and % copy relates it to the measured memory-copy
bandwidth of the device: how close a memory-bound op gets to the ceiling.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from collections import defaultdict

SCHEMA_VERSION = 1


def git_sha() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return None


def environment() -> dict:
    """Machine, versions and build, for the JSON header."""
    import effnet_kernels

    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "hostname": platform.node(),
                    "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": {m: _version(m) for m in
                     ("torch", "triton", "timm", "onnxruntime", "numpy", "effnet_kernels")},
        "python": platform.python_version(),
        "build_info": effnet_kernels.build_info(),
    }


def add_derived(rows: list[dict], copy_gbps: float | None) -> None:
    """Fill gbps, pct_copy_bw and speedup_vs_{eager,compile} in place."""
    base = defaultdict(dict)
    for r in rows:
        base[_case_key(r)][r["provider"]] = r["median_ms"]
    for r in rows:
        r["gbps"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9 if r.get("bytes") else None
        r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbps if r["gbps"] and copy_gbps else None
        for ref in ("eager", "compile"):
            t = base[_case_key(r)].get(ref)
            r[f"speedup_vs_{ref}"] = t / r["median_ms"] if t else None


def _case_key(r: dict) -> tuple:
    return (r["op"], r["shape"], r["mode"], r["memory_format"], r["dtype"], r["device"])


def _x(v) -> str:
    return f"x{v:.2f}" if v else "-"


def _f(v, fmt="{:.1f}") -> str:
    return fmt.format(v) if v is not None else "-"


def format_table(headers: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h)
              for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(out)


def op_table(rows: list[dict]):
    headers = ["op", "shape (N,C,H,W k s)", "mode", "format", "provider", "median ms",
               "p20-p80 ms", "GB/s", "% copy", "vs eager", "vs compile"]
    lines = []
    for r in rows:
        d = r["dims"]
        dims = f"{d['n']},{d['c']},{d['h']},{d['w']}" + (
            f" k{d['kernel']} s{d['stride']}" if "kernel" in d else "")
        lines.append([r["op"], f"{r['shape']} ({dims})", r["mode"], r["memory_format"],
                      r["provider"], f"{r['median_ms']:.3f}",
                      f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", _f(r["gbps"], "{:.3g}"),
                      _f(r["pct_copy_bw"], "{:.0f}%"), _x(r["speedup_vs_eager"]),
                      _x(r["speedup_vs_compile"])])
    return headers, lines


def e2e_table(rows: list[dict]):
    eager = {r["mode"]: r["img_per_s"] for r in rows if r["provider"] == "eager"}
    headers = ["model", "provider", "mode", "batch", "res", "img/s", "vs eager", "median ms",
               "saved MB/img", "peak GPU MB"]
    lines = []
    for r in rows:
        saved = r.get("saved_bytes_per_image")
        peak = r.get("peak_train_bytes")
        ref = eager.get(r["mode"])
        lines.append([r["model"], r["provider"], r["mode"], str(r["batch"]), str(r["resolution"]),
                      f"{r['img_per_s']:.1f}", _x(r["img_per_s"] / ref if ref else None),
                      f"{r['median_ms']:.1f}", _f(saved / 2**20 if saved else None, "{:.2f}"),
                      _f(peak / 2**20 if peak else None, "{:.0f}")])
    return headers, lines


def selfcheck_table(rows: list[dict]):
    headers = ["op", "backend", "case", "mode", "dtype", "result", "worst", "max error", "bound"]
    lines = []
    for r in rows:
        if r.get("skipped"):
            lines.append([r["op"], "-", r["case"], "-", "-", "skipped", r["skipped"], "-", "-"])
            continue
        result = "ok" if r["ok"] else "FAIL"
        lines.append([r["op"], r["backend"], r["case"], r["mode"], r.get("dtype", "float32"), result,
                      r.get("worst", r.get("error", "")),
                      _f(r.get("max_error"), "{:.2e}"), _f(r.get("bound"), "{:.2e}")])
    return headers, lines


def skipped_table(skipped: list[dict]):
    lines = [[s["section"], s.get("what", "-"), str(s.get("count", 1)), s["reason"]]
             for s in skipped]
    return ["section", "what", "cases", "reason"], lines


def format_markdown(headers: list[str], lines: list[list[str]]) -> str:
    rows = [headers, ["---"] * len(headers)] + [[c.replace("|", "/") for c in ln] for ln in lines]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def write_markdown(path: str, result: dict) -> None:
    s = result["settings"]
    env = result["environment"]
    parts = [
        f"# effnet-kernels bench ({s['level']}, {s['device']}, {s['dtype']})",
        f"{env['timestamp']} · git {env['git_sha'] or '-'} · torch {env['versions']['torch']} · "
        f"{env['build_info'].get('gpu') or env['machine']['processor'] or 'cpu'} · "
        f"{result['threads']} threads · copy bandwidth {_f(result['copy_bandwidth_gbps'])} GB/s",
        f"host allocator: {env.get('host_allocator', '-')}",
    ]
    for title, key, fn in (("Self-check", "selfcheck", selfcheck_table), ("Ops", "rows", op_table),
                           ("End to end", "e2e", e2e_table), ("Skipped", "skipped", skipped_table)):
        if result.get(key):
            parts += [f"## {title}", format_markdown(*fn(result[key]))]
    with open(path, "w") as f:
        f.write("\n\n".join(parts) + "\n")


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def plot_all(result: dict, out_dir: str) -> list[str]:
    """PNG plots (matplotlib Agg); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    rows = [r for r in result["rows"] if r["provider"] != "eager" and r["speedup_vs_eager"]]
    modes = sorted({r["mode"] for r in rows}, reverse=True)
    tag = f"{result['settings']['device']} {result['settings']['dtype']}"
    if rows:  # per op: geometric-mean speedup vs eager over its shapes
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            groups = defaultdict(list)
            for r in rows:
                if r["mode"] == mode:
                    groups[(r["op"], r["provider"])].append(r["speedup_vs_eager"])
            _bars(ax, groups, f"{mode}: geomean speedup vs eager ({tag})")
        save(fig, "speedup_ops.png")
    for op in sorted({r["op"] for r in rows}):
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 3.8), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            groups = defaultdict(list)
            for r in rows:
                if r["op"] == op and r["mode"] == mode:
                    groups[(f"{r['shape']}\n{r['memory_format']}", r["provider"])].append(
                        r["speedup_vs_eager"])
            _bars(ax, groups, f"{op} {mode}: speedup vs eager per layer ({tag})")
        save(fig, f"speedup_{op}.png")
    e2e = result.get("e2e") or []
    if e2e:
        kinds = [k for k in ("train", "infer") if any(r["mode"] == k for r in e2e)]
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            sel = [r for r in e2e if r["mode"] == kind]
            ax.bar([r["provider"] for r in sel], [r["img_per_s"] for r in sel], color="tab:blue")
            ax.set_title(f"{sel[0]['model']} {kind} img/s (batch {sel[0]['batch']}, {tag})",
                         fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
        save(fig, "e2e_throughput.png")
        mem = [r for r in e2e if r["mode"] == "train" and r.get("saved_bytes_per_image")]
        if mem:
            peak = [r for r in mem if r.get("peak_train_bytes")]
            fig, axes = plt.subplots(1, 1 + bool(peak), figsize=(5 * (1 + bool(peak)), 3.6),
                                     squeeze=False)
            axes[0][0].bar([r["provider"] for r in mem],
                           [r["saved_bytes_per_image"] / 2**20 for r in mem], color="tab:green")
            axes[0][0].set_title("saved activations, MB per image", fontsize=9)
            if peak:
                axes[0][1].bar([r["provider"] for r in peak],
                               [r["peak_train_bytes"] / 2**20 for r in peak], color="tab:red")
                axes[0][1].set_title("peak GPU memory of a training step, MB", fontsize=9)
            save(fig, "e2e_memory.png")
    return written


def _bars(ax, groups: dict, title: str) -> None:
    """Grouped bars: x = first key part, one bar per provider (second key part)."""
    xs = list(dict.fromkeys(k[0] for k in groups))
    provs = list(dict.fromkeys(k[1] for k in groups))
    width = 0.8 / max(len(provs), 1)
    for i, p in enumerate(provs):
        vals = [geomean(groups[(x, p)]) if groups.get((x, p)) else 0.0 for x in xs]
        ax.bar([j + i * width for j in range(len(xs))], vals, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("x faster than eager", fontsize=8)
    ax.set_xticks([j + width * (len(provs) - 1) / 2 for j in range(len(xs))])
    ax.set_xticklabels(xs, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
