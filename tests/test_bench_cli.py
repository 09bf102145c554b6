"""The `effnet-kernels bench` / `info` command: a smoke run end to end, its JSON schema and
plots, and clear errors for bad arguments (each in a subprocess, as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from effnet_kernels.bench import cli, report
from effnet_kernels.bench.runner import spread
from effnet_kernels.bench.selfcheck import run_selfcheck
from effnet_kernels.bench.timing import quantile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The smoke run takes ~30 s on an idle 2-core CPU; the limit leaves room for a busy machine.
SMOKE_TIMEOUT_S = 600


def run_cli(*args, timeout=120):
    # as a user runs it: tests/conftest.py turns the Triton CPU interpreter on for the suite
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run([sys.executable, "-m", "effnet_kernels", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run_cli("bench", "--smoke", "--device", "cpu", "--out", str(out), timeout=SMOKE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, proc, json.load(f)


def test_smoke_json_header(smoke):
    _, _, result = smoke
    for key, typ in {"schema_version": int, "complete": bool, "environment": dict,
                     "settings": dict, "threads": int, "copy_bandwidth_gbps": float,
                     "selfcheck": list, "rows": list, "e2e": list, "skipped": list,
                     "plots": list, "duration_s": float}.items():
        assert isinstance(result[key], typ), key
    assert result["complete"] is True
    env = result["environment"]
    for key in ("timestamp", "git_sha", "machine", "versions", "build_info"):
        assert key in env
    assert env["versions"]["torch"] == torch.__version__
    assert env["host_allocator"].startswith("keep"), env["host_allocator"]
    assert result["settings"]["level"] == "smoke"
    assert result["threads"] >= 1 and result["copy_bandwidth_gbps"] > 0


def test_smoke_rows(smoke):
    _, _, result = smoke
    rows = result["rows"]
    assert rows, "no op was measured"
    for r in rows:
        assert isinstance(r["provider"], str) and isinstance(r["op"], str)
        assert isinstance(r["shape"], str) and isinstance(r["dims"], dict)
        assert r["mode"] in ("train", "eval") and r["memory_format"] in ("nchw", "channels_last")
        assert isinstance(r["median_ms"], float) and r["median_ms"] > 0
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert isinstance(r["bytes"], int) and r["bytes"] > 0
        assert r["gbps"] > 0
    # eager always runs, and its speedup against itself is exactly 1
    eager = [r for r in rows if r["provider"] == "eager"]
    assert eager and all(r["speedup_vs_eager"] == pytest.approx(1.0) for r in eager)
    assert {r["op"] for r in rows} <= {"depthwise", "squeeze_excite", "drop_connect"}
    assert any(r["provider"].startswith("fused:") for r in rows)


def test_smoke_selfcheck_e2e_skipped(smoke):
    _, _, result = smoke
    checks = [c for c in result["selfcheck"] if not c.get("skipped")]
    assert checks and all(c["ok"] for c in checks)
    assert any(c["backend"] == "reference" for c in checks)
    for r in result["e2e"]:
        assert r["mode"] in ("train", "infer") and r["img_per_s"] > 0
        assert isinstance(r["provider"], str) and r["median_ms"] > 0
    assert any(r["provider"] == "eager" for r in result["e2e"])
    for s in result["skipped"]:  # every skipped part says why
        assert s["section"] and s["what"] and s["reason"] and s["count"] >= 1


def test_selfcheck_follows_ops_and_dtype():
    """The self-check runs the benchmark's --ops in its --dtype (bfloat16: every backend that
    serves it on the CPU, under the parity rule of that dtype)."""
    rows = run_selfcheck(torch.device("cpu"), ops=["drop_connect"], dtype=torch.bfloat16)
    assert rows and {r["op"] for r in rows} == {"drop_connect"}
    assert all(r["ok"] and r["dtype"] == "bfloat16" for r in rows), rows
    assert {"reference", "cpu"} <= {r["backend"] for r in rows}
    table = report.selfcheck_table(rows)
    assert "dtype" in table[0] and all("bfloat16" in line for line in table[1])
    with pytest.raises(ValueError, match="ops must be among"):
        run_selfcheck(torch.device("cpu"), ops=["pooling"])


def test_smoke_outputs(smoke):
    out, proc, result = smoke
    assert result["plots"]
    for path in result["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, path
    assert (out / "report.md").read_text().startswith("# effnet-kernels bench")
    assert "vs eager" in proc.stdout and "Parity self-check" in proc.stdout


def test_info():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "cpu_ext" in proc.stdout and "backends on cpu" in proc.stdout
    assert "reference" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--dtype", "float8"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--ops", "depthwise,nope"], "--ops must be"),
    (["--model", "resnet50"], "--model must name an EfficientNet"),
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--compile-budget", "-1"], "--compile-budget must be >= 0"),
    (["--quick", "--smoke"], "not allowed with"),
])
def test_bad_arguments(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_bad_arguments_subprocess(tmp_path):
    proc = run_cli("bench", "--out", str(tmp_path), "--dtype", "float8")
    assert proc.returncode == 2
    assert "invalid choice: 'float8'" in proc.stderr and "usage: effnet-kernels bench" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    proc = run_cli("bench", "--device", "cuda", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr


def test_spread_and_quantile():
    assert spread(list(range(10)), 3) == [0, 4, 9] or spread(list(range(10)), 3) == [0, 5, 9]
    assert spread([1, 2], None) == [1, 2] and spread([1, 2, 3], 1) == [2]
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile([1.0, 2.0], 0.2) == pytest.approx(1.2)


def test_speedups_and_bandwidth():
    dims = {"n": 1, "c": 1, "h": 1, "w": 1}
    base = {"op": "depthwise", "shape": "s", "dims": dims, "mode": "eval",
            "memory_format": "nchw", "dtype": "float32", "device": "cpu", "bytes": 2_000_000}
    rows = [dict(base, provider=p, median_ms=t, p20_ms=t, p80_ms=t)
            for p, t in (("eager", 2.0), ("compile", 1.0), ("fused:cpu", 0.5))]
    report.add_derived(rows, copy_gbps=8.0)
    fused = rows[2]
    assert fused["speedup_vs_eager"] == pytest.approx(4.0)
    assert fused["speedup_vs_compile"] == pytest.approx(2.0)
    assert fused["gbps"] == pytest.approx(4.0) and fused["pct_copy_bw"] == pytest.approx(50.0)
    text = report.format_table(*report.op_table(rows))
    assert "x4.00" in text and "x2.00" in text


def test_page_faults_per_call_counts_fresh_pages():
    from effnet_kernels.bench.e2e import page_faults_per_call

    cpu = torch.device("cpu")
    # 64 MiB is above glibc's largest mmap threshold: every call maps and touches fresh
    # pages (at least one fault even with transparent huge pages); doing nothing faults
    # far less than one page per 4 KiB of that.
    fresh = page_faults_per_call(lambda: torch.empty(1 << 24).fill_(1.0), cpu)
    idle = page_faults_per_call(lambda: None, cpu, calls=4)
    assert fresh is not None and fresh >= 1 and 0 <= idle < 64
    assert page_faults_per_call(lambda: None, torch.device("cuda")) is None


def test_top_level_aten_ops_counts_each_dispatch_once():
    from effnet_kernels.bench.dispatch import top_level_aten_ops

    x = torch.randn(4, 3)
    counts = top_level_aten_ops(lambda: torch.nn.functional.linear(x, x).relu().add(1))
    # linear runs t / addmm inside itself: counted once, as aten::linear
    assert counts == {"aten::linear": 1, "aten::relu": 1, "aten::add": 1}


def test_depthwise_passes_bench_calls_every_primitive():
    """benchmarks/bench_depthwise_passes.py: its callables run every CPU primitive it times
    (a tiny stride-2 layer; the script itself only adds the timing loops), and its cold
    timing calls each callable once per round, after a warm-up round."""
    import importlib.util
    import pathlib

    from effnet_kernels._ext import ext_module
    from effnet_kernels.shapes import DepthwiseShape

    if ext_module() is None:
        pytest.skip("the C++ extension is not built")
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_depthwise_passes.py"
    spec = importlib.util.spec_from_file_location("bench_depthwise_passes", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for kernel in (1, 5):
        fns = bench.pass_callables(ext_module().cpu, DepthwiseShape("tiny", 2, 8, 9, 9, kernel, 2))
        assert set(fns) == set(bench.COLUMNS) and set(bench.PASSES) < set(bench.COLUMNS)
        for fn in fns.values():
            fn()
    calls = []
    medians = bench.cold_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                 rounds=3, megabytes=1)
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())
    assert calls == ["a", "b"] * 4  # a warm-up round, then three timed ones


def test_plan_python_cost_times_every_fused_block_without_its_kernels(capsys):
    """benchmarks/bench_host_overhead.py --plan-python: a cost for each of B0's 16 fused
    blocks, taken on their eval plans (it raises where a block falls back to its modules),
    and the compiled calls put back afterwards."""
    import importlib.util
    import pathlib

    from effnet_kernels._ext import ext_module
    from effnet_kernels.nn import eval_plan

    pytest.importorskip("timm")
    if ext_module() is None or eval_plan._cpu_prims() is None:
        pytest.skip("the eval plans need the C++ extension with its GEMM")
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_host_overhead.py"
    spec = importlib.util.spec_from_file_location("bench_host_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = eval_plan._run
    costs = bench.plan_python_cost("efficientnet_b0", 1, 32, calls=3)
    assert len(costs) == 16 and all(c > 0 for c in costs.values())
    assert eval_plan._run is run
    out = capsys.readouterr().out
    assert "MBConv: 15 blocks" in out and "DepthwiseSeparable: 1 blocks" in out


def test_round_orders_vary_who_runs_before_whom():
    """Every provider runs first and runs after each other provider in some round (a cyclic
    rotation would keep each one behind the same neighbour)."""
    from effnet_kernels.bench.timing import round_order

    names = ["eager", "converted", "compile", "onnxruntime"]
    orders = [round_order(names, r) for r in range(10)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == [round_order(names, r) for r in range(10)]  # reproducible
    assert {o[0] for o in orders} == set(names)
    before = {(o[i - 1], o[i]) for o in orders for i in range(1, len(o))}
    assert all((a, b) in before for a in names for b in names if a != b)


def test_eager_baselines_run_timms_own_ops():
    """The eager side of the op benchmarks is what a timm EfficientNet runs, op for op: the
    drop-connect baseline gives timm's drop_path + add bitwise from the same seed and
    dispatches the same ATen ops (the mask, not x, divided by keep), and the SE baseline
    matches timm's SqueezeExcite (SiLU, as EfficientNet's) with the same weights."""
    pytest.importorskip("timm")
    from timm.layers import drop_path
    from timm.models._efficientnet_blocks import SqueezeExcite

    from effnet_kernels.bench.dispatch import top_level_aten_ops
    from effnet_kernels.bench.providers import DropConnectEager, SqueezeExciteEager

    x, shortcut = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    ours = DropConnectEager(0.25).train()
    torch.manual_seed(3)
    got = ours(x, shortcut)
    torch.manual_seed(3)
    want = shortcut + drop_path(x, 0.25, training=True)
    assert torch.equal(got, want)
    assert top_level_aten_ops(lambda: ours(x, shortcut)) == top_level_aten_ops(
        lambda: shortcut + drop_path(x, 0.25, training=True))

    se = SqueezeExciteEager(6, 2)
    timm_se = SqueezeExcite(6, rd_channels=2, act_layer=torch.nn.SiLU)  # as EfficientNet builds it
    timm_se.load_state_dict(se.state_dict())
    torch.testing.assert_close(se(x), timm_se(x), rtol=0, atol=0)
