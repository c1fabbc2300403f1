"""The benchmarks must not rot between the runs that record them. The GPU check script
(benchmarks/gpu_check.sh) is run by a session that has a GPU for a few minutes: its dry run takes
every part, with the same flags, on the CPU with tiny models, and must finish with every check
passed and every JSON record complete. benchmarks/redis_blobs.py runs on a small blob."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def json_line(log: str) -> dict:
    lines = [line for line in log.splitlines() if line.startswith("{")]
    assert lines, log[-2000:]
    return json.loads(lines[-1])


def test_gpu_check_dry_run_runs_every_part_and_reports(tmp_path):
    out = tmp_path / "out"
    # BUDGET_S is the device call's limit: here (about 90 s alone) a loaded CI host must not hit it.
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PY": sys.executable, "BUDGET_S": "1500"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "=== gpu_check: all passed" in proc.stdout

    checks = json_line((out / "cuda_check.log").read_text())["checks"]
    assert set(checks) >= {"smoke_bf16", "batched_vs_solo_fp32", "batched_vs_solo_bf16", "job_1000_under_60s",
                           "graphs_vs_eager_fp32", "graphs_vs_eager_bf16", "graphs_vs_eager_bf16_compiled"}
    assert all(c["ok"] for c in checks.values()), checks
    # On the CPU batching is exact to float noise, as tests/test_batching.py asserts.
    assert checks["batched_vs_solo_fp32"]["mean"] < 2e-5

    bench = json_line((out / "bench_graphs.log").read_text())
    assert set(bench["results"]) == {"reference", "engine_1", "engine_1_graphs", "engine_batch"}   # (b) both ways
    for loop in bench["results"].values():
        assert loop["job_iterations_per_s"] > 0 and loop["flops_per_step"] > 0 and loop["peak_memory_bytes"] > 0
    assert bench["results"]["engine_batch"]["jobs"] == bench["max_batch"] >= 2
    # Batched FLOPs are the jobs' FLOPs: one forward/backward over B slots does B jobs' work.
    one, many = bench["results"]["engine_1"]["flops_per_step"], bench["results"]["engine_batch"]["flops_per_step"]
    assert abs(many / one - bench["max_batch"]) < 0.05 * bench["max_batch"]
    assert bench["ratios"]["reference"] == 1.0 and bench["ratios"]["engine_batch"] > 0
    assert bench["cuda_graphs"] is True and bench["graphs_captured"] is False   # asked for; none on a CPU
    assert bench["warmup"] >= 4
    for key in ("reference", "engine_1", "engine_1_graphs"):   # (a) and each (b) under torch.profiler
        profiled = bench["profile"][key]
        assert profiled["loop"] == key and profiled["busy_ms_per_step"] > 0 and profiled["kernels_per_step"] > 0
        assert profiled["top"] and all(op["ms_per_step"] > 0 for op in profiled["top"])
    # The engine dispatches fewer ATen calls a step than the notebook's loop (engine.attention, one
    # grid_sample for the cut-outs): what a GPU waiting on its host is waiting for.
    calls = {key: bench["profile"][key]["aten_calls_per_step"] for key in ("reference", "engine_1")}
    assert 0 < calls["engine_1"] < 0.9 * calls["reference"], calls

    compiled = json_line((out / "bench_compile_graphs.log").read_text())   # the reference again: one run's ratios
    assert bench["compile"] is None and compiled["compile"] == "eager"
    assert set(compiled["results"]) == set(bench["results"]) and compiled["ratios"]["reference"] == 1.0
    assert compiled["ratios"]["engine_1_graphs"] > 0 and compiled["cuda_graphs"] is True


def test_redis_blobs_benchmark_saves_and_loads_through_a_real_server_and_reports():
    """benchmarks/redis_blobs.py on a small blob: its own redis-server, every run saved and loaded
    whole (it asserts that), the JSON record complete; a 12 MiB blob takes three 4 MiB chunks."""
    proc = subprocess.run([sys.executable, "benchmarks/redis_blobs.py", "--mib", "12", "--runs", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json_line(proc.stdout)
    assert record["benchmark"] == "redis_blobs" and record["mib"] == 12 and record["blob_chunk_mib"] == 4
    (run,) = record["runs"]
    assert run["save_s"] > 0 and run["load_s"] > 0 and run["redis_s"] > 0
    assert run["commands"] >= 3 + 1   # three chunks staged, one commit (plus the fence and lookups)
    assert 0 < run["longest_ms"] <= run["redis_s"] * 1000


def test_contact_sheet_benchmark_times_now_and_a_past_revision():
    """benchmarks/contact_sheet.py, small: the sheet now and at git revision HEAD, both
    rendered in one run, and its JSON record."""
    proc = subprocess.run([sys.executable, "benchmarks/contact_sheet.py", "--tiles", "2", "--chars", "60",
                           "--against", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["tiles"] == 2 and record["seconds"] > 0 and record["seconds_then"] > 0 and record["speedup"] > 0
