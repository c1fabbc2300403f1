"""Benchmark the optimisation loop on full-size architectures with random weights.

    .venv/bin/python benchmarks/bench_loop.py                    # CUDA if present, else the CPU
    .venv/bin/python benchmarks/bench_loop.py --device cuda --grid 32 --iterations 50 --max-batch 16
    .venv/bin/python benchmarks/bench_loop.py --tiny --device cpu   # a dry run of this script (tests)

One process, one run, three loops on the same models (CLIP ViT-B/32 + OpenAI's default dVAE
decoder, random weights, built directly with engine.random_models and frozen as engine.models
loads them; `--via-files DIR` instead saves them in OpenAI's formats and loads them through
engine.models, like real files):

  (a) reference: benchmarks/reference_loop.py, the seed article's notebook loop (batch 1, a Python
      loop over cut-outs, F.interpolate + torchvision rotate; on CUDA in the notebook's fp16, and
      also in fp32 as (a32));
  (b) engine, one job: BatchRunner with one slot (settings.precision, bf16 autocast on CUDA;
      with --cuda-graphs its step replayed from a CUDA graph);
  (c) engine, max_batch jobs in one forward/backward pass (default on CUDA: choose_max_batch).

Every loop takes a frame every 50 iterations, as the bot does. Each loop is warmed up on its own
(the first warm-up step under torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions,
attention, forward and backward; the peak memory of the warm-up steps: CUDA's
max_memory_allocated, or on a CPU the peak RSS, reset between loops and including the models'
weights); then the timed steps are taken in rounds with the loops taking turns (on a CPU one step
a round, so that other load on a shared machine falls on all of them alike). For each loop:
job-iterations per second, the ratio to (a), peak memory, FLOPs per step and the TFLOP/s that
makes, against the GPU's dense bf16 peak. The last line is JSON.

On a CPU only the ratios mean anything (and little: the CPU is not what the bot runs on).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from engine import random_models  # noqa: E402
from engine.capacity import (ClipVisualDims, DecoderDims, choose_max_batch, effective_precision,  # noqa: E402
                             per_slot_bytes)
from engine.generate import GRAPH_WARMUP_STEPS, BatchRunner, GenerationSettings, Slot, encode_targets  # noqa: E402
from engine.models import Models, load_models, prepare_clip, prepare_decoder  # noqa: E402
from reference_loop import ReferenceLoop  # noqa: E402

PROMPT = "a beautiful and mysterious house designed by Escher"

# Dense (no sparsity) peak TFLOP/s: bf16/fp16 tensor cores. Source: NVIDIA's data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


def gpu_peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if all(part in name for part in key.split()):
            return name, value
    return name, None


def build_models(device: torch.device, via_files: str | None, tiny: bool = False) -> Models:
    clip_model = random_models.make_clip(random_models.TINY_CLIP if tiny else random_models.VIT_B_32, seed=0)
    decoder = random_models.make_decoder(tiny=tiny, seed=0)
    if via_files:
        root = Path(via_files)
        root.mkdir(parents=True, exist_ok=True)
        clip_path = random_models.save_clip_torchscript(clip_model, root / "ViT-B-32-random.pt")
        decoder_path = random_models.save_pickled_module(decoder, root / "decoder-random.pkl")
        return load_models(str(clip_path), str(decoder_path), device, cache_dir=root / "cache", trust_decoder=True)
    # What engine.models.load_models does after reading the files.
    return Models(clip=prepare_clip(clip_model, device), decoder=prepare_decoder(decoder, device), device=device)


class PeakMemory:
    """Peak memory of one loop: CUDA's allocator peak, or the process's peak RSS (VmHWM, reset
    through /proc/self/clear_refs where Linux allows it)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Loop:
    key: str
    name: str
    step: Callable[[], Any]
    jobs: int
    flop_step: Callable[[], Any] | None = None
    seconds: float = 0.0
    result: dict = field(default_factory=dict)


def warm_up(loop: Loop, args, device: torch.device, memory: PeakMemory) -> None:
    """Untimed steps; the first under FlopCounterMode; the peak memory of these steps."""
    memory.reset()
    flops = None
    for i in range(args.warmup):
        if i == 0:
            counter = FlopCounterMode(display=False)
            with counter:
                (loop.flop_step or loop.step)()
            flops = counter.get_total_flops()
        else:
            loop.step()
    sync(device)
    loop.result = {"name": loop.name, "jobs": loop.jobs, "peak_memory_bytes": memory.peak(), "flops_per_step": flops}


def time_loops(loops: list[Loop], args, device: torch.device) -> None:
    """`args.iterations` timed steps of each loop, in `args.rounds` rounds that take turns (so that
    other load on a shared machine falls on every loop alike)."""
    per_round = [args.iterations // args.rounds + (r < args.iterations % args.rounds) for r in range(args.rounds)]
    for n in per_round:
        for loop in loops:
            sync(device)
            started = time.perf_counter()
            for _ in range(n):
                loop.step()
            sync(device)
            loop.seconds += time.perf_counter() - started
    for loop in loops:
        r, flops = loop.result, loop.result["flops_per_step"]
        r.update({
            "seconds": round(loop.seconds, 4),
            "job_iterations_per_s": round(loop.jobs * args.iterations / loop.seconds, 4),
            "step_ms": round(1000 * loop.seconds / args.iterations, 2),
            "tflops": round(flops * args.iterations / loop.seconds / 1e12, 4) if flops else None,
        })
        print(f"  {loop.name:<26} {r['job_iterations_per_s']:9.3f} job-it/s  step {r['step_ms']:9.1f} ms  "
              f"peak {r['peak_memory_bytes'] / 2**30:6.2f} GiB  "
              f"{(flops or 0) / 1e12:8.3f} TFLOP/step  {r['tflops'] or 0:8.3f} TFLOP/s", flush=True)


def profile_loop(loop: Loop, steps: int, device: torch.device, top: int = 12) -> dict:
    """`steps` steps of `loop` under torch.profiler: where a step's time goes. The device's busy
    time per step (its kernels' own times, summed) against the step's unprofiled time tells a step
    bound by launching kernels from Python (the device mostly idle) from one bound by the kernels;
    the top ops say which kernels. On a CPU the ops' own CPU times. Prints a table; returns the
    figures (times per step, in ms)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            loop.step()
        sync(device)
    events = prof.key_averages()
    own = "self_device_time_total" if cuda else "self_cpu_time_total"    # microseconds
    kernels = [e for e in events if e.device_type == DeviceType.CUDA] if cuda else list(events)
    busy_ms = sum(getattr(e, own) for e in kernels) / 1000 / steps
    print(f"profile of {loop.name}, {steps} steps ({'kernels on the device' if cuda else 'ops on the CPU'}):")
    print(events.table(sort_by=own, row_limit=top), flush=True)
    ranked = sorted(kernels, key=lambda e: getattr(e, own), reverse=True)[:top]
    return {
        "loop": loop.key, "steps": steps, "busy_ms_per_step": round(busy_ms, 3),
        "busy_fraction": round(busy_ms / loop.result["step_ms"], 4) if loop.result.get("step_ms") else None,
        "kernels_per_step": round(sum(e.count for e in kernels) / steps, 1),
        # What the host dispatches (nested calls counted): on a GPU that waits for its host, the work to cut.
        "aten_calls_per_step": round(sum(e.count for e in events if e.device_type == DeviceType.CPU
                                         and e.key.startswith("aten::")) / steps, 1),
        "top": [{"name": e.key[:120], "ms_per_step": round(getattr(e, own) / 1000 / steps, 3),
                 "calls_per_step": round(e.count / steps, 1)} for e in ranked],
    }


def engine_runner(models: Models, targets, settings: GenerationSettings, jobs: int,
                  compile: bool | str, cuda_graphs: bool = False) -> BatchRunner:
    runner = BatchRunner(models, compile=compile, cuda_graphs=cuda_graphs)
    for i in range(jobs):
        runner.add(Slot(f"job-{i}", models, targets, replace(settings, seed=settings.seed + i)))
    return runner


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", type=int, default=None, help="logits grid (default 32 -> 256x256; 8 with --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="the tests' tiny models instead of full-size ones: a dry run of this script, no figures")
    p.add_argument("--iterations", type=int, default=None, help="timed steps (default 50 on CUDA, 2 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 1 on a CPU)")
    p.add_argument("--max-batch", type=int, default=None, help="jobs in (c) (default: choose_max_batch on CUDA, 2 on a CPU)")
    p.add_argument("--cutn", type=int, default=12)
    p.add_argument("--precision", default="auto", help="the engine's: auto | fp32 | bf16 | fp16")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND[:MODE]",
                   help="the engine with torch.compile (opt-in; default inductor; inductor:reduce-overhead adds CUDA graphs; `eager` for a dry run)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the engine with BatchRunner(cuda_graphs=True): (b), a job alone, replays its step "
                        "from a CUDA graph (captured during the warm-up, which takes at least GRAPH_WARMUP_STEPS + 2 "
                        "steps then); nothing on a CPU")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS steps of (a) and (b) (torch.profiler): the device's busy "
                        "time per step against the step's time, the top kernels, and the ATen calls a step")
    p.add_argument("--skip-reference-fp32", action="store_true", help="on CUDA, do not run (a32)")
    p.add_argument("--skip-reference", action="store_true", help="only the engine: ratios to (a) left out")
    p.add_argument("--dalle-half-casts", choices=("on", "off"), default="off",
                   help="off (default, as engine.models loads the decoder): the engine's loops run without "
                        "dall_e's own fp16 conv casts (autocast alone decides); on: keep them, to compare. "
                        "The reference loop always keeps them on CUDA, as the notebook did (a copy of its own)")
    p.add_argument("--via-files", nargs="?", const="", default=None, metavar="DIR",
                   help="save the random models in OpenAI's formats and load them through engine.models")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the utilisation figure")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed steps are taken in rounds, the loops taking turns (default: one step a "
                        "round on a CPU, where other load comes and goes; one round on CUDA)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.grid = args.grid or (8 if args.tiny else 32)
    args.iterations = args.iterations or (50 if cuda else 2)
    args.warmup = max(1, args.warmup if args.warmup is not None else (5 if cuda else 1))
    if args.cuda_graphs:   # the capture and a first replay inside the warm-up, not timed
        args.warmup = max(args.warmup, GRAPH_WARMUP_STEPS + 2)
    args.rounds = max(1, min(args.iterations, args.rounds or (1 if cuda else args.iterations)))
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name, peak = gpu_peak_tflops(device)
    peak = args.peak_tflops or peak

    t0 = time.perf_counter()
    via = args.via_files
    tmp = None
    if via == "":
        tmp = tempfile.TemporaryDirectory(prefix="bench-models-")
        via = tmp.name
    models = build_models(device, via, args.tiny)
    model_names = "tiny random CLIP + dVAE decoder" if args.tiny else "full-size random ViT-B/32 + dVAE decoder"
    print(f"models: {model_names}, {'saved and loaded via engine.models' if via else 'built directly'}"
          f" on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
    targets = encode_targets(models, PROMPT)
    # Frames every 50 iterations; never finishing inside the run.
    settings = GenerationSettings(iterations=10**9, frame_every=50, grid=args.grid, cutn=args.cutn,
                                  precision=args.precision, seed=1)
    engine_models = models   # as engine.models loads the decoder: none of dall_e's own fp16 casts
    if args.dalle_half_casts == "on":  # a copy with them, to compare
        engine_models = replace(models, decoder=copy.deepcopy(models.decoder))
        for module in engine_models.decoder.modules():
            if hasattr(module, "use_float16"):
                module.use_float16 = True
    if args.max_batch is None:
        args.max_batch = (choose_max_batch(device, args.grid, cutn=args.cutn, precision=args.precision, models=engine_models)
                          if cuda else 2)
    eff = effective_precision(device, args.precision)
    estimate = per_slot_bytes(args.grid, args.cutn, eff, DecoderDims.of(models.decoder), ClipVisualDims.of(models.clip),
                              decoder_half_casts=args.dalle_half_casts == "on")
    print(f"device {device_name}; grid {args.grid} ({8 * args.grid}px), cutn {args.cutn}, engine precision {eff}, "
          f"warmup {args.warmup}, timed {args.iterations}, max_batch {args.max_batch} "
          f"(per-slot estimate {estimate / 2**30:.2f} GiB); torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    memory = PeakMemory(device)
    loops: list[Loop] = []
    if not args.skip_reference:
        torch.manual_seed(0)
        ref = ReferenceLoop(models, targets, settings, precision="notebook")
        loops.append(Loop("reference", "(a) reference" + (" fp16" if cuda else ""), ref.step, 1))
        if cuda and not args.skip_reference_fp32:
            ref32 = ReferenceLoop(models, targets, settings, precision="fp32")
            loops.append(Loop("reference_fp32", "(a32) reference fp32", ref32.step, 1))
    engines = [("engine_1", "(b) engine, 1 job", 1, False)]
    if args.cuda_graphs:
        engines.append(("engine_1_graphs", "(b) engine, 1 job, graphs", 1, True))
    engines.append(("engine_batch", f"(c) engine, {args.max_batch} jobs", args.max_batch, False))
    runners = {}
    for key, label, jobs, graphs in engines:
        runners[key] = engine_runner(engine_models, targets, settings, jobs, args.compile or False, graphs)
        flop_step = None
        if args.compile or graphs:  # count FLOPs on a plain twin: the counter, compiled code and graphs do not mix
            flop_step = engine_runner(engine_models, targets, settings, jobs, False).step
        loops.append(Loop(key, label, runners[key].step, jobs, flop_step))
    for loop in loops:
        warm_up(loop, args, device, memory)
    captured = None
    if args.cuda_graphs:   # whether (b)'s graph was captured in its warm-up: else its figure is eager's
        captured = any(g.replay is not None for g in runners["engine_1_graphs"]._graphs.values())
        print(f"(b) with graphs: {'captured' if captured else 'NOT captured (no CUDA, or the capture failed: see the log)'}",
              flush=True)
    print(f"warmed up; timing {args.iterations} steps of each in {args.rounds} round(s)", flush=True)
    time_loops(loops, args, device)
    results = {loop.key: loop.result for loop in loops}

    ratios = {}
    if "reference" in results:
        base = results["reference"]["job_iterations_per_s"]
        ratios = {k: round(v["job_iterations_per_s"] / base, 3) for k, v in results.items()}
    if "reference_fp32" in results:
        base32 = results["reference_fp32"]["job_iterations_per_s"]
        ratios.update({f"{k}_vs_fp32": round(results[k]["job_iterations_per_s"] / base32, 3)
                       for k in results if k.startswith("engine")})
    projected_1000 = round(1000 / results["engine_1"]["job_iterations_per_s"], 1)
    projected_graphs = (round(1000 / results["engine_1_graphs"]["job_iterations_per_s"], 1)
                        if captured else None)
    if ratios:
        print("ratios to (a): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"a 1000-iteration job alone at grid {args.grid}: about {projected_1000} s (from (b); frames included)"
          + (f", {projected_graphs} s with a CUDA graph" if projected_graphs is not None else ""))
    if peak:
        for k, v in results.items():
            if v["tflops"] is not None:
                v["utilisation"] = round(v["tflops"] / peak, 4)
        print("utilisation of the dense bf16 peak (%.0f TFLOP/s): " % peak
              + ", ".join(f"{k} {v.get('utilisation', 0) * 100:.1f}%" for k, v in results.items()))
    summary = {
        "benchmark": "bench_loop", "date": datetime.date.today().isoformat(), "device": device_name,
        "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "models": model_names + ", " + ("via engine.models files" if via else "built directly"),
        "grid": args.grid, "cutn": args.cutn, "precision": eff, "compile": args.compile,
        "cuda_graphs": args.cuda_graphs, "graphs_captured": captured,
        "dalle_half_casts": args.dalle_half_casts,
        "iterations": args.iterations, "warmup": args.warmup, "rounds": args.rounds, "max_batch": args.max_batch,
        "per_slot_estimate_bytes": estimate, "peak_tflops": peak,
        "results": results, "ratios": ratios, "projected_1000_iterations_s": projected_1000,
        "projected_1000_iterations_graphs_s": projected_graphs,
        "profile": None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary), flush=True)
    if args.profile > 0:
        # After the record above: a profiler that fails (it has crashed next to CUDA graphs) loses
        # only itself. The record is printed again with the profile.
        for key in [k for k in ("reference", "engine_1", "engine_1_graphs") if k in results]:
            profiled = summary["profile"] = {**(summary["profile"] or {}), key: profile_loop(
                next(loop for loop in loops if loop.key == key), args.profile, device)}
            print(f"{results[key]['name']}: the device busy {profiled[key]['busy_ms_per_step']} ms of its "
                  f"{results[key]['step_ms']} ms step ({(profiled[key]['busy_fraction'] or 0) * 100:.0f}%), "
                  f"{profiled[key]['kernels_per_step']} kernels and {profiled[key]['aten_calls_per_step']} "
                  f"ATen calls a step", flush=True)
        print(json.dumps(summary), flush=True)
    if tmp is not None:
        tmp.cleanup()
    return summary


if __name__ == "__main__":
    record = main()
    # Graphs asked for on CUDA and not captured: the run did not measure what it was asked to.
    sys.exit(1 if record["device_type"] == "cuda" and record["cuda_graphs"] and not record["graphs_captured"] else 0)
