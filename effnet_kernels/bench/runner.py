"""Runs a benchmark from resolved settings (bench/cli.py): self-check, copy bandwidth, ops,
end to end, report. The JSON is rewritten after every section (complete: false until the
end), so a run cut short by a time limit still leaves its measurements behind. Nothing
that is missing or fails crashes the run: it is recorded under "skipped" with the reason.
Exit status: 0, or 1 when a parity self-check failed.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

from . import report
from .cli import DTYPES
from .e2e import run_e2e
from .host_allocator import set_host_allocator
from .providers import Case, Unavailable, bytes_moved, clear_compiled, fused_providers, make, op_shapes
from .selfcheck import run_selfcheck
from .timing import copy_bandwidth_gbps, measure_interleaved, set_threads


def spread(items: list, k: int | None) -> list:
    """k items evenly spread over the list (first and last included); all when k is None."""
    if k is None or k >= len(items):
        return list(items)
    if k == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def plan_cases(s: dict) -> list[tuple[str, object, str, str]]:
    """(op, shape, mode, memory format) for every op case of the run."""
    cases = []
    for op in s["ops"]:
        for shape in spread(op_shapes(op, s["variant"], s["batch"], s["resolution"]),
                            s["shapes_per_op"]):
            for mode in ("train", "eval"):
                for fmt in s["memory_formats"]:
                    cases.append((op, shape, mode, fmt))
    return cases


class Run:
    def __init__(self, s: dict):
        self.s = s
        self.device = torch.device(s["device"])
        self.dtype = DTYPES[s["dtype"]]
        self.compile_spent = 0.0
        self.result = {
            "schema_version": report.SCHEMA_VERSION, "complete": False,
            "environment": {**report.environment(),
                            "host_allocator": set_host_allocator(s["host_allocator"])},
            "settings": s,
            "threads": set_threads(s["threads"]), "copy_bandwidth_gbps": None,
            "selfcheck": [], "rows": [], "e2e": [], "skipped": [], "plots": [],
        }
        os.makedirs(s["out"], exist_ok=True)
        self.json_path = os.path.join(s["out"], "results.json")

    def skip(self, section: str, what: str, reason: str) -> None:
        """Record a skipped part once; repeats (same what and reason) only bump its count."""
        for entry in self.result["skipped"]:
            if (entry["section"], entry["what"], entry["reason"]) == (section, what, reason):
                entry["count"] += 1
                return
        self.result["skipped"].append(
            {"section": section, "what": what, "reason": reason, "count": 1})

    def save(self) -> None:
        report.write_json(self.json_path, self.result)

    def compile_allowed(self) -> str | None:
        budget = self.s["compile_budget_s"]
        if budget is None or self.compile_spent < budget:
            return None
        return (f"torch.compile budget of {budget:g} s spent ({self.s['level']} level); "
                "raise --compile-budget or run without --quick/--smoke")

    def op_case(self, op, shape, mode, fmt) -> None:
        fused, unusable = fused_providers(op, self.device, self.dtype)
        label = f"{op}/{shape.name}/{mode}/{fmt}"
        for prov, why in unusable.items():  # a backend unusable here: once per op
            self.skip("ops", f"{op}/{prov}", why)
        fns, compile_s = {}, None
        for prov in fused + ["eager", "compile"]:
            case = Case(op, prov, shape, mode, self.dtype, self.device, fmt)
            if prov == "compile" and (why := self.compile_allowed()):
                self.skip("ops", f"{op}/compile", why)
                continue
            try:
                fns[prov] = make(case)
            except Unavailable as exc:
                self.skip("ops", f"{label}/{prov}", str(exc))
            except Exception as exc:  # noqa: BLE001
                self.skip("ops", f"{label}/{prov}", f"{type(exc).__name__}: {exc}"[:300])
            if prov == "compile":
                compile_s = getattr(fns.get(prov), "compile_s", None)
                self.compile_spent += compile_s or 0.0
        timings = measure_interleaved(
            fns, self.device, warmup=self.s["warmup"], rounds=self.s["rounds"],
            min_sample_ms=self.s["min_sample_ms"],
            on_error=lambda p, e: self.skip("ops", f"{label}/{p}", f"{type(e).__name__}: {e}"[:300]))
        dims = {k: v for k, v in vars(shape).items() if k != "name"}
        for prov, t in timings.items():
            case = Case(op, prov, shape, mode, self.dtype, self.device, fmt)
            row = {"op": op, "provider": prov, "shape": shape.name, "dims": dims, "mode": mode,
                   "memory_format": fmt, "dtype": self.s["dtype"], "device": self.device.type,
                   **t.as_dict(), "bytes": bytes_moved(case)}
            if prov == "compile":
                row["compile_s"] = compile_s
            self.result["rows"].append(row)
        del fns
        clear_compiled()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self) -> int:
        s, t_start = self.s, time.perf_counter()
        cases = [] if not s["ops"] else plan_cases(s)
        e2e_units = 0 if s["skip_e2e"] else len(s["e2e_providers"]) + 2
        bar = tqdm(total=2 + len(cases) + e2e_units, desc="effnet-kernels bench", unit="step",
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        if s["skip_selfcheck"]:
            self.skip("selfcheck", "-", "--skip-selfcheck")
        else:
            bar.set_postfix_str("parity self-check")
            self.result["selfcheck"] = run_selfcheck(torch.device(s["device"]), s["ops"],
                                                     dtype=self.dtype)
        bar.update()
        bar.set_postfix_str("copy bandwidth")
        mb = 1024 if self.device.type == "cuda" else (16 if s["level"] == "smoke" else 64)
        self.result["copy_bandwidth_gbps"] = copy_bandwidth_gbps(self.device, mb)
        bar.update()
        self.save()
        for op, shape, mode, fmt in cases:
            bar.set_postfix_str(f"{op} {shape.name} {mode} {fmt}")
            self.op_case(op, shape, mode, fmt)
            bar.update()
            self.save()
        report.add_derived(self.result["rows"], self.result["copy_bandwidth_gbps"])
        if s["skip_e2e"]:
            self.skip("e2e", "-", "--skip-e2e")
        else:
            self.e2e(bar)
        bar.close()
        self.result["duration_s"] = time.perf_counter() - t_start
        self.result["complete"] = True
        self.result["plots"] = report.plot_all(self.result, s["out"])
        self.save()
        report.write_markdown(os.path.join(s["out"], "report.md"), self.result)
        return self.print_summary()

    def e2e(self, bar) -> None:
        s = self.s
        providers = list(s["e2e_providers"])  # the op cases' compile budget does not apply
        if self.device.type != "cpu" and "onnxruntime" in providers:
            providers.remove("onnxruntime")
            self.skip("e2e", "onnxruntime", "onnxruntime is measured on CPU only")
        for _ in set(s["e2e_providers"]) - set(providers):
            bar.update()
        bar.set_postfix_str(f"e2e {s['model']}")
        self.result["e2e"] = run_e2e(
            s["model"], self.device, self.dtype, s["e2e_batch"], s["e2e_resolution"], providers,
            threads=self.result["threads"], warmup=int(s["level"] != "smoke"),
            rounds=s["e2e_rounds"],
            skip=lambda p, why: self.skip("e2e", p, why), progress=lambda _: bar.update())

    def print_summary(self) -> int:
        r = self.result
        print(f"\neffnet-kernels bench: {r['settings']['level']} on {r['settings']['device']} "
              f"{r['settings']['dtype']}, {r['threads']} threads, copy bandwidth "
              f"{r['copy_bandwidth_gbps']:.1f} GB/s, {r['duration_s']:.0f} s")
        print(f"host allocator: {r['environment']['host_allocator']}")
        load = r["environment"]["machine"]["loadavg_at_start"]
        if load and load[0] > (os.cpu_count() or 1):
            print(f"WARNING: load average {load[0]:.1f} on {os.cpu_count()} CPUs at start: the "
                  "machine is busy and these timings are not trustworthy")
        failed = [c for c in r["selfcheck"] if c.get("ok") is False]
        if r["selfcheck"]:
            print("\nParity self-check (fp32 vs the reference truth):")
            print(report.format_table(*report.selfcheck_table(r["selfcheck"])))
        if r["rows"]:
            print("\nOps (speedup = eager or compile time / provider time):")
            print(report.format_table(*report.op_table(r["rows"])))
        if r["e2e"]:
            print("\nEnd to end:")
            print(report.format_table(*report.e2e_table(r["e2e"])))
        if r["skipped"]:
            print(f"\nSkipped ({len(r['skipped'])}):")
            print(report.format_table(*report.skipped_table(r["skipped"])))
        print(f"\nWrote {self.json_path}, {os.path.join(self.s['out'], 'report.md')} and "
              f"{len(r['plots'])} plots in {self.s['out']}")
        if failed:
            print(f"\nPARITY SELF-CHECK FAILED for {len(failed)} case(s): see the table above")
            return 1
        return 0


def run_bench(settings: dict) -> int:
    return Run(settings).run()
