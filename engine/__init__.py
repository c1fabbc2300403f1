"""imagine-bot's engine: CLIP-guided optimisation of DALL-E's dVAE decoder, its queue and workers."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed imagine-bot's version, what `--version` prints on every host: the bot and every
    worker sharing one Redis must run the same one (README, Upgrading several hosts)."""
    try:
        return version("imagine-bot")
    except PackageNotFoundError:   # run from a source tree that was never installed
        return "unknown (not installed)"
