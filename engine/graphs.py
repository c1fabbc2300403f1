"""One job's whole optimiser step as a CUDA graph, for `BatchRunner(cuda_graphs=True)`.

Why: alone on a GPU, a job's step (0.83 TFLOP at grid 32) takes 31-54 ms on an H200, 2-3% of its
peak (docs/PERFORMANCE.md): the time goes to launching a few thousand small kernels from Python,
not to arithmetic. A captured graph replays the whole step (noise draws, decoder, cut-outs, CLIP,
backward, Adam) as one launch.

What a captured step needs, which `BatchRunner` arranges:
- every tensor the step reads or writes outlives the graph and stays where it is: the slot's
  logits and Adam's moments (updated in place), Adam's step count on the device (`capturable`),
  the learning rate as a device tensor filled before each replay (`make_capturable`: a float
  would be baked into the graph), the loss copied into a tensor made before the capture;
- the slot's own random generator registered with the graph, so each replay draws the next noise
  as an eager step would (`capture_step`);
- autocast without its cast cache, in every step, not only the captured one (cached casts made
  in a capture die with it; and dynamo guards on the setting, so a compiled region warmed up
  under another one would be compiled again inside the capture, which dynamo refuses);
- steps run before the capture, on a side stream (PyTorch's recipe: lazy initialisation,
  cuDNN's and Triton's tuning happen there, not in the capture), and a probe of the step with
  host syncs made errors (a sync inside a capture breaks it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

# (body, generator) -> replay. `capture_step` on CUDA; a test on a CPU passes one that returns the
# body itself (its "replay" runs the step eagerly), to check the runner's use of graphs.
Capture = Callable[[Callable[[], None], torch.Generator], Callable[[], None]]


def capture_step(body: Callable[[], None], generator: torch.Generator) -> Callable[[], None]:
    """`body` captured as a CUDA graph on the current device; returns its replay. Nothing of `body`
    runs now (a capture records kernels, it does not run them): the first replay is the first step.
    `generator`, the only random generator `body` draws from, is registered with the graph."""
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    # thread_local: the worker's other threads (its event loop, PNG encoding) may call into CUDA
    # while this one captures; "global" would fail the capture for what they do.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        body()
    return graph.replay


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """The optimiser (Adam), in place, as a captured step needs it: on CUDA `capturable` (its step
    count lives on the device, its bias corrections are computed there, no host read), and every
    group's learning rate a 0-d tensor on its parameters' device (`set_lr` fills it before each
    step). Adam's state keeps its values: a capturable Adam continues the same run."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        if device.type == "cuda":
            group["capturable"] = True
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    # Its steps before the capture (and after, once the slot shares a batch) run capturable
    # uncaptured, on purpose: Adam's one-off warning that this "can impair performance" says
    # nothing to an operator (a few small kernels a step).
    optimizer._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]
    for per_param in optimizer.state.values():
        step = per_param.get("step")
        if torch.is_tensor(step) and step.device.type == "cpu":
            for group in optimizer.param_groups:
                if group.get("capturable"):
                    per_param["step"] = step.to(group["params"][0].device, torch.float32)


def set_lr(group: dict[str, Any], lr: float) -> None:
    """Set a parameter group's learning rate: in place where it is a tensor (no host sync: a fill
    queued on the device; a graph reads that tensor), else as the float it is."""
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def portable_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser `state_dict` (host copies) that any worker can load, graphs or none: learning
    rates as floats, `capturable` off (an unfused capturable Adam only runs on a GPU: a CPU
    worker of a version before Slot's Adam was fused would fail at its first step). Adam puts the
    step count back where its own settings want it when it loads the state."""
    groups = [dict(g, lr=float(g["lr"]), capturable=False) for g in state.get("param_groups", [])]
    return dict(state, param_groups=groups)


@contextlib.contextmanager
def side_stream(side: torch.cuda.Stream | None) -> Iterator[None]:
    """The block's CUDA work on the stream `side`, after what the current stream has queued and
    before what it queues next (None: on the current stream, as on a CPU)."""
    if side is None:
        yield
        return
    current = torch.cuda.current_stream(side.device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        current.wait_stream(side)
