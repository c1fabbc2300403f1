"""A torch.compile backend of the test's own, registered for a block (tests/test_batching.py,
tests/test_worker.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def compile_backend(name: str, backend: Callable[..., Any]) -> Iterator[str]:
    """`backend` registered as torch.compile backend `name` for the block, with dynamo's caches reset
    on both sides (so the regions compile again with it, and later tests do not reuse its graphs)."""
    import torch._dynamo
    from torch._dynamo.backends.registry import _COMPILER_FNS   # to unregister it

    torch._dynamo.register_backend(backend, name=name)
    torch._dynamo.reset()
    try:
        yield name
    finally:
        _COMPILER_FNS.pop(name, None)
        torch._dynamo.reset()
