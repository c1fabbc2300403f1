#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the pure-Python packages the engine needs that the GPU machine's
# image lacks, so that benchmarks/gpu_check.sh can install them there without an index.
# The image has torch, torchvision, numpy, pillow, safetensors, regex, tqdm and requests
# (/work/.library/device/KINDS.md); it lacks openai-clip (and its ftfy + wcwidth), DALL-E, and a
# setuptools old enough to keep pkg_resources, which clip/clip.py imports (removed in 81).
#
#   bash benchmarks/device_wheels.sh            # here, with the package index reachable
#   then, on the device: bash benchmarks/gpu_check.sh   (it installs .whl/*.whl when present)
#
# The device runs Python 3.12 on x86-64: every wheel here is pure Python (py3-none-any) except
# wcwidth's abi3 one, fetched for that platform. openai-clip is published only as an sdist, so
# its wheel is built here (pure Python: it works on any CPython 3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "DALL-E==0.1" "ftfy>=6" "wcwidth" "setuptools<81"
# Pinned as in pyproject.toml (the engine is tested with 1.0.1).
"$PY" -m pip wheel -q --no-deps -w .whl "openai-clip==1.0.1"
ls -l .whl
du -sh .whl
