"""`torch.compile` settings as the operator writes them (`[worker] compile`, `imagine-worker
--compile`, `BatchRunner(compile=)`). Torch-free: the bot checks its configuration without it."""

from __future__ import annotations

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(value: bool | str | None) -> dict[str, str] | None:
    """`torch.compile` keywords for a `compile` setting, or None for none: False/None/"" -> None,
    True -> inductor, "BACKEND" or "BACKEND:MODE" (MODE one of COMPILE_MODES; a mode is inductor's).
    ValueError for a setting it cannot be."""
    if value is None or value is False or value == "":
        return None
    if value is True:
        return {"backend": "inductor"}
    backend, _, mode = str(value).strip().partition(":")
    if not backend:
        raise ValueError(f"compile {value!r}: expected BACKEND or BACKEND:MODE, e.g. inductor or inductor:reduce-overhead")
    if not mode:
        return {"backend": backend}
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile {value!r}: the mode must be one of {', '.join(COMPILE_MODES)}")
    if backend != "inductor":
        raise ValueError(f"compile {value!r}: a mode is inductor's (inductor:{mode})")
    return {"backend": backend, "mode": mode}
