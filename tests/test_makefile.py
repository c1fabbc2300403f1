"""The Makefile's front door: `make` alone lists the commands, and `make imagine PROMPT=...` hands
the prompt over as typed. Real make runs on the repository's Makefile; a stand-in venv (its
`python` this interpreter, its `imagine` a script that prints its arguments) and a fresh stamp keep
it from installing anything or rendering, and stand-in system commands (stub_path) keep its
system-deps from installing ffmpeg: it runs apt-get, through sudo when not root, where there is
none."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(cwd), *args], capture_output=True, text=True, timeout=120,
                          env=env)


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def stub_path(folder: Path) -> tuple[dict[str, str], Path]:
    """An environment whose PATH starts with `folder`, holding what system-deps looks for (ffmpeg
    and ffprobe, which do nothing) and what it would install with (apt-get and sudo, which write
    their arguments to the returned file and fail): the test never installs a package, nor waits
    on sudo's password, on a machine without ffmpeg."""
    folder.mkdir()
    installs = folder / "installs.log"
    for tool in ("ffmpeg", "ffprobe"):
        _script(folder / tool, "exit 0")
    for tool in ("apt-get", "sudo"):
        _script(folder / tool, f'echo "{tool} $*" >> "{installs}"; exit 1')
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}, installs


def test_make_alone_lists_the_readmes_commands():
    """It ran python-check (the first target) and said nothing. The list is the README's, word for
    word (its first bash block), so that the two do not drift apart."""
    proc = _make()
    readme_block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [*readme_block.splitlines(), "See README.md."]


@pytest.mark.parametrize("prompt", [
    'a $5 burger "sharp"',
    "it's `id` $(shell echo hi) $$HOME \\n | by Escher:0.5",
])
def test_make_imagine_passes_the_prompt_as_typed(prompt, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("")
    (venv / "bin" / "python").symlink_to(sys.executable)
    imagine = venv / "bin" / "imagine"
    imagine.write_text('#!/bin/sh\nfor a in "$@"; do printf "[%s]\\n" "$a"; done\n')
    imagine.chmod(0o755)
    stamp = tmp_path / "installed"
    stamp.write_text("")   # newer than pyproject.toml and the Makefile: nothing to install
    env, installs = stub_path(tmp_path / "bin")
    proc = _make("imagine", f"VENV={venv}", f"STAMP={stamp}", f"PROMPT={prompt}", env=env)
    assert not installs.exists(), installs.read_text()
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.strip().splitlines()
    assert args[:2] == [f"[{prompt}]", "[--out]"] and args[2].startswith("[out/"), proc.stdout
