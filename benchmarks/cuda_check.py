"""Correctness checks of the batched loop on a GPU (run by benchmarks/gpu_check.sh).

    .venv/bin/python benchmarks/cuda_check.py                  # on CUDA, full-size random models
    .venv/bin/python benchmarks/cuda_check.py --tiny --device cpu   # a dry run of this script

1. smoke: two jobs, bf16 autocast (precision auto), a few steps: finite losses, frames of the
   right size, similarities that are numbers;
2. no host sync in steps that take no frame: `torch.cuda.set_sync_debug_mode("error")`;
3. batched vs solo on the GPU, fp32 (TF32 off) and bf16: logits, the frame's codes (argmax),
   similarities; next to the run-to-run noise of a solo job run twice (CUDA's atomics make even a
   solo run non-deterministic);
4. memory per slot: peak allocated at batch 1, 2 and 4, the slope against engine.capacity's
   estimate, and what choose_max_batch then picks;
5. a 1000-iteration 256x256 (grid 32) job alone through engine.generate.generate, timed;
6. out of memory: four jobs under a memory cap (`torch.cuda.set_per_process_memory_fraction`) that
   holds two in one pass but not four: the pass of four fails with CUDA's own out-of-memory error,
   the runner learns passes of two (`pass_limit`), and no job fails (the worker's `on_failure` path);
7. CUDA graphs (`BatchRunner(cuda_graphs=True)`): a job alone, captured after its warm-up and
   replayed, against the same job eager, fp32 (TF32 off) and bf16: logits, codes, loss, next to a
   solo job run twice; its random generator where the eager one's is (the replays drew the same
   noise); no host sync in replayed steps; and in bf16 with torch.compile (the `eager` backend:
   dynamo's guards, which a capture must not fail). (On a CPU, the dry run, a stand-in capture
   that runs the step eagerly: it checks the script, not graphs.)

Prints every number, `PASS`/`FAIL` per check, and a JSON line at the end. Exit status 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from engine import capacity, random_models  # noqa: E402
from engine.attention import stock_attention  # noqa: E402
from engine.generate import GRAPH_MIN_REPLAYS, GRAPH_WARMUP_STEPS, BatchRunner, GenerationSettings, Slot, encode_targets, generate  # noqa: E402
from engine.models import Models, prepare_clip, prepare_decoder  # noqa: E402

PROMPTS = ["a red house by the sea", "a cat made of glass | blurry:-0.5", "a forest at night"]
report: dict = {"checks": {}}


def verdict(name: str, ok: bool, **numbers) -> None:
    report["checks"][name] = {"ok": bool(ok), **numbers}
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {shown}", flush=True)


def build(device: torch.device, tiny: bool) -> Models:
    if tiny:
        decoder = random_models.make_decoder(tiny=True)
        clip_model = random_models.make_clip(random_models.TINY_CLIP)
    else:
        decoder = random_models.make_decoder(tiny=False)
        clip_model = random_models.make_clip(random_models.VIT_B_32)
    return Models(clip=prepare_clip(clip_model, device), decoder=prepare_decoder(decoder, device), device=device)


def run(models: Models, settings: GenerationSettings, keys: list[int], steps: int,
        cuda_graphs: Any = False, precast: bool = True) -> dict[int, Slot]:
    runner = BatchRunner(models, cuda_graphs=cuda_graphs, precast=precast)
    slots = {}
    for k in keys:
        prompt = PROMPTS[k % len(PROMPTS)]
        slots[k] = runner.add(Slot(k, models, encode_targets(models, prompt), replace(settings, seed=100 + k)))
    for _ in range(steps):
        runner.step()
    return slots


def compare(a: Slot, b: Slot) -> dict:
    d = (a.logits.detach() - b.logits.detach()).abs()
    same_codes = (a.logits.argmax(1) == b.logits.argmax(1)).float().mean().item()
    return {"mean": d.mean().item(), "max": d.max().item(), "codes_equal": same_codes,
            "loss_diff": abs(a.last_loss - b.last_loss)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models (a dry run of the script itself)")
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--long-iterations", type=int, default=1000, help="0: leave check 5 out")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, free {torch.cuda.mem_get_info(device)[0] / 2**30:.1f} GiB", flush=True)
    grid = 8 if args.tiny else args.grid
    started = time.perf_counter()
    models = build(device, args.tiny)
    print(f"models built in {time.perf_counter() - started:.1f} s", flush=True)
    base = GenerationSettings(iterations=10**6, frame_every=3, grid=grid, cutn=12)

    # 1. smoke, bf16 autocast
    runner = BatchRunner(models)
    slots = [runner.add(Slot(k, models, encode_targets(models, PROMPTS[k]), replace(base, seed=k))) for k in (0, 1)]
    frames = []
    t = time.perf_counter()
    for _ in range(3):
        frames += [f for _, f in runner.step() if f is not None]
    ok = (len(frames) == 2 and all(f.pixels.shape == (8 * grid, 8 * grid, 3) for f in frames)
          and all(math.isfinite(f.loss) and math.isfinite(f.similarity) for f in frames))
    verdict("smoke_bf16", ok, frames=len(frames), loss=frames[0].loss if frames else float("nan"),
            seconds=time.perf_counter() - t)

    # 2. no host sync in steps without a frame (iterations 4 and 5; the frame is at 6)
    if cuda:
        error = None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        failed: list[Exception] = []
        try:
            for _ in range(2):
                runner.step(on_failure=lambda slot, exc: failed.append(exc))  # the worker's path
            if failed:
                error = str(failed[0]).splitlines()[0]
        except RuntimeError as exc:
            error = str(exc).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        verdict("no_sync_in_hot_loop", error is None, error=error or "none")
    del runner, slots

    # 3. batched vs solo, fp32 (TF32 off) and bf16
    steps = 5
    for precision in ("fp32", "auto"):
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if precision == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        s = replace(base, precision=precision, frame_every=10**6)
        solo_a = run(models, s, [0], steps)[0]
        solo_a2 = run(models, s, [0], steps)[0]
        solo_b = run(models, s, [1], steps)[1]
        batch = run(models, s, [0, 1, 2], steps)
        noise = compare(solo_a, solo_a2)
        da, db = compare(batch[0], solo_a), compare(batch[1], solo_b)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        # Tolerances: fp32 as on the CPU (tests/test_batching.py) but 10x looser for CUDA's atomics
        # and dall_e's fp16 convolutions (they run in fp16 even here); bf16 much looser.
        mean_tol, codes_tol, loss_tol = (2e-4, 0.999, 1e-4) if precision == "fp32" else (5e-3, 0.99, 5e-3)
        ok = all(d["mean"] <= max(mean_tol, 3 * noise["mean"]) and d["codes_equal"] >= codes_tol
                 and d["loss_diff"] <= max(loss_tol, 3 * noise["loss_diff"]) for d in (da, db))
        verdict(f"batched_vs_solo_{'fp32' if precision == 'fp32' else 'bf16'}", ok,
                mean=max(da["mean"], db["mean"]), max=max(da["max"], db["max"]),
                codes_equal=min(da["codes_equal"], db["codes_equal"]), loss_diff=max(da["loss_diff"], db["loss_diff"]),
                solo_twice_mean=noise["mean"], solo_twice_max=noise["max"])

    # 4. memory per slot
    if cuda:
        peaks = {}
        s = replace(base, frame_every=10**6)
        for n in (1, 2, 4):
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run(models, s, list(range(n)), 2)
            torch.cuda.synchronize()
            peaks[n] = torch.cuda.max_memory_allocated(device) - before
        slope = (peaks[4] - peaks[1]) / 3
        half_casts = any(getattr(m, "use_float16", False) for m in models.decoder.modules())
        estimate = capacity.per_slot_bytes(grid, 12, "bf16", capacity.DecoderDims.of(models.decoder),
                                           capacity.ClipVisualDims.of(models.clip), decoder_half_casts=half_casts)
        chosen = capacity.choose_max_batch(device, grid, models=models)
        chosen_measured = capacity.choose_max_batch(device, grid, per_slot_bytes=int(slope * capacity.SAFETY))
        # The estimate should cover what is measured, without wasting more than half.
        verdict("per_slot_memory", slope <= estimate <= 2 * slope, measured_GiB=slope / 2**30,
                estimate_GiB=estimate / 2**30, peak_1=peaks[1] / 2**30, peak_2=peaks[2] / 2**30,
                peak_4=peaks[4] / 2**30, max_batch_estimate=chosen, max_batch_if_measured=chosen_measured)

    # 5. one 1000-iteration 256x256 job alone, end to end
    iterations = 20 if args.tiny else args.long_iterations
    if iterations > 0:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = generate(PROMPTS[0], GenerationSettings(iterations=iterations, frame_every=50, grid=grid), models)
        seconds = time.perf_counter() - t
        verdict("job_1000_under_60s", seconds < 60 or args.tiny, seconds=seconds, iterations=iterations,
                frames=len(result.frames), it_per_s=iterations / seconds)

    # 6. a real CUDA out-of-memory error halves the passes and fails no job
    if cuda:
        s = replace(base, frame_every=10**6)
        # What a pass of two takes above what is held now (slots and Adam's moments included).
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run(models, s, [0, 1], 2)
        torch.cuda.synchronize()
        two = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        index = torch.cuda.current_device() if device.index is None else device.index  # it takes no bare "cuda"
        # Room for a pass of two and a half: four need about twice two's activations.
        cap = torch.cuda.memory_reserved(device) + int(1.25 * two)
        failed: list[str] = []
        runner = BatchRunner(models)
        for k in range(4):
            runner.add(Slot(k, models, encode_targets(models, PROMPTS[k % len(PROMPTS)]), replace(s, seed=k)))
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
        try:
            for _ in range(3):
                runner.step(on_failure=lambda slot, exc: failed.append(f"{slot.key}: {type(exc).__name__}"))
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
        limit = next(iter(runner.pass_limit.values()), None)
        verdict("oom_halves_passes", limit is not None and limit >= 1 and not failed
                and all(sl.iteration == 3 for sl in runner.slots.values()),
                pass_limit=limit or 0, failed=len(failed), two_GiB=two / 2**30, cap_GiB=cap / 2**30)
        del runner
        torch.cuda.empty_cache()

    # 7. CUDA graphs: a job alone, graphed, against the same job eager
    graphs: Any = True if cuda else (lambda step, generator: step)    # the dry run: a stand-in
    # Enough steps for a graph (GRAPH_MIN_REPLAYS ahead); compared after a few replays.
    steps = GRAPH_WARMUP_STEPS + 6
    # compile="eager": dynamo traces the two regions (no code generated: quick) and guards them, as
    # inductor's would be guarded: a guard that fails inside the capture fails it.
    for precision, compile in (("fp32", False), ("auto", False), ("auto", "eager")):
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if precision == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        s = replace(base, precision=precision, frame_every=10**6, iterations=GRAPH_WARMUP_STEPS + GRAPH_MIN_REPLAYS)
        eager, eager2 = run(models, s, [0], steps)[0], run(models, s, [0], steps)[0]
        runner = BatchRunner(models, compile=compile, cuda_graphs=graphs)
        graphed = runner.add(Slot(0, models, encode_targets(models, PROMPTS[0]), replace(s, seed=100)))
        for _ in range(steps - 2):
            runner.step()
        error = None
        if cuda:   # the last two steps are replays: no host sync in them
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                runner.step()
        except RuntimeError as exc:
            error = str(exc).splitlines()[0]
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        captured = bool(runner._graphs) and next(iter(runner._graphs.values())).replay is not None
        noise, d = compare(eager, eager2), compare(graphed, eager)
        rng_equal = torch.equal(graphed.generator.get_state(), eager.generator.get_state())
        mean_tol, codes_tol, loss_tol = (2e-4, 0.999, 1e-4) if precision == "fp32" else (5e-3, 0.99, 5e-3)
        ok = (captured and error is None and rng_equal and graphed.iteration == steps
              and d["mean"] <= max(mean_tol, 3 * noise["mean"]) and d["codes_equal"] >= codes_tol
              and d["loss_diff"] <= max(loss_tol, 3 * noise["loss_diff"]))
        verdict(f"graphs_vs_eager_{'fp32' if precision == 'fp32' else 'bf16'}{'_compiled' if compile else ''}", ok,
                captured=captured,
                rng_equal=rng_equal, sync_error=error or "none", mean=d["mean"], max=d["max"],
                codes_equal=d["codes_equal"], loss_diff=d["loss_diff"], eager_twice_mean=noise["mean"],
                eager_twice_max=noise["max"])
        del runner, graphed

    # 8. the engine's CLIP attention (engine.attention) against nn.MultiheadAttention's, and a
    # bf16 job run from the runner's bf16 copies of the models (precast) against autocast's casts
    stock = copy.deepcopy(models.clip)
    stock_attention(stock)
    images = torch.rand(12, 3, models.clip_resolution, models.clip_resolution, device=device)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        lean_fp32, stock_fp32 = models.clip.encode_image(images), stock.encode_image(images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            lean_bf16, stock_bf16 = models.clip.encode_image(images).float(), stock.encode_image(images).float()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    d32 = ((lean_fp32 - stock_fp32).abs().max() / stock_fp32.abs().max()).item()
    d16 = ((lean_bf16 - stock_bf16).abs().max() / stock_bf16.abs().max()).item()
    verdict("lean_attention", d32 <= 1e-4 and d16 <= 3e-2, fp32_max_rel=d32, bf16_max_rel=d16)
    del stock
    s = replace(base, precision="auto", frame_every=10**6)
    precast, precast2 = run(models, s, [0], 5)[0], run(models, s, [0], 5)[0]
    plain = run(models, s, [0], 5, precast=False)[0]
    noise, d = compare(precast, precast2), compare(precast, plain)
    ok = d["mean"] <= max(5e-3, 3 * noise["mean"]) and d["codes_equal"] >= 0.99 and d["loss_diff"] <= max(5e-3, 3 * noise["loss_diff"])
    verdict("precast_vs_autocast_bf16", ok, mean=d["mean"], max=d["max"], codes_equal=d["codes_equal"],
            loss_diff=d["loss_diff"], precast_twice_mean=noise["mean"], precast_twice_max=noise["max"])

    report["device"] = torch.cuda.get_device_name(device) if cuda else str(device)
    report["torch"] = torch.__version__
    print(json.dumps(report), flush=True)
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
