"""`torch.compile` settings as the operator writes them (`[worker] compile`, `imagine-worker
--compile`, `BatchRunner(compile=)`). Torch-free: the bot checks its configuration without it."""

from __future__ import annotations

import os
import shutil

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The default of `[worker] compile` and `imagine-worker --compile`: inductor where it was measured
# to pay (CUDA: 1.7x the job-iterations per second of eager at a batch of 32 on an H200, 1.35-1.74x
# at batch 1, docs/PERFORMANCE.md), nothing on a CPU (no measured gain there, and minutes of compiling).
AUTO = "auto"


def c_compiler() -> str | None:
    """The C compiler Triton would build its kernel launchers with, or None: $CC as given, else gcc,
    else clang (Triton's own order). Without one every inductor kernel on CUDA fails to load, and
    CUDA "runtime" images ship none."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("gcc") or shutil.which("clang")


def compile_options(value: bool | str | None, device_type: str | None = None) -> dict[str, str] | None:
    """`torch.compile` keywords for a `compile` setting on a device of `device_type` ("cuda",
    "cpu", ...; None when only the setting's form is checked), or None for none: False/None/"" ->
    None, True -> inductor, "auto" -> inductor on CUDA where a C compiler is found (`c_compiler`),
    else None; "BACKEND" or "BACKEND:MODE" (MODE one of COMPILE_MODES; a mode is inductor's).
    ValueError for a setting it cannot be."""
    if value is None or value is False or value == "":
        return None
    if value is True:
        return {"backend": "inductor"}
    if str(value).strip() == AUTO:
        return {"backend": "inductor"} if device_type == "cuda" and c_compiler() else None
    backend, _, mode = str(value).strip().partition(":")
    if not backend:
        raise ValueError(f"compile {value!r}: expected auto, BACKEND or BACKEND:MODE, e.g. inductor or inductor:reduce-overhead")
    if not mode:
        return {"backend": backend}
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile {value!r}: the mode must be one of {', '.join(COMPILE_MODES)}")
    if backend != "inductor":
        raise ValueError(f"compile {value!r}: a mode is inductor's (inductor:{mode})")
    return {"backend": backend, "mode": mode}


# The modes in which inductor makes CUDA graphs of its own (its `triton.cudagraphs` option).
GRAPHING_MODES = ("reduce-overhead", "max-autotune")


def check_cuda_graphs(compile: bool | str | None, cuda_graphs: object) -> None:
    """ValueError when `cuda_graphs` (the engine's own graphs of a job alone, `BatchRunner`) is
    asked for with a `compile` setting that makes CUDA graphs of its own (GRAPHING_MODES): one
    capture inside the other does not work."""
    mode = (compile_options(compile) or {}).get("mode")
    if cuda_graphs and mode in GRAPHING_MODES:
        raise ValueError(f"cuda_graphs with compile {compile!r}: {mode} makes CUDA graphs of its own; use "
                         "compile inductor (or auto, or inductor:max-autotune-no-cudagraphs) with cuda_graphs, "
                         f"or {mode} alone")
