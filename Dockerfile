# syntax=docker/dockerfile:1
# imagine-bot: one image for the bot (the default command) and the GPU worker (`imagine-worker`).
#
#   docker build -t imagine-bot:local .
#   # one GPU box, no other server: the bot with its embedded worker, its SQLite queue on a volume
#   # (the working directory is /data, so the default sqlite:///imagine-bot.db is /data/imagine-bot.db)
#   docker run -d --restart unless-stopped --stop-timeout 60 --gpus '"device=0"' --env-file .env \
#       -v imagine-data:/data -v imagine-cache:/cache \
#       --mount type=bind,src="$PWD/config.toml",dst=/config/config.toml,readonly imagine-bot:local
#   # a GPU worker of a Redis queue, on any host (compose.yaml runs the bot, Redis and workers); it
#   # loads CLIP, the dVAE decoder and encoder (init images; --encoder '' for none) into /cache
#   docker run -d --restart unless-stopped --stop-timeout 60 --gpus '"device=0"' -v imagine-cache:/cache \
#       imagine-bot:local imagine-worker --queue redis://redis-host:6379/0
# --restart: the bot and the worker exit 1 for a supervisor to restart them (Discord unreachable at
# start, a dead GPU thread, a lost bot lease). --stop-timeout: time to checkpoint running jobs and
# hand them back (Docker's default, 10 s, may kill it first). --mount, not -v: a missing
# config.toml is refused, where -v would make an empty folder of that name.
# Without --gpus the bot starts no worker (no CUDA): jobs would wait for an imagine-worker. Mount a
# named volume (or a folder uid 10001 can write) at /data: without one the SQLite file lands in an
# anonymous volume, which `docker rm -v` deletes with the container.
#
# Base: PyTorch's official CUDA *runtime* image (CUDA, cuDNN and a CUDA build of torch; no compilers),
# pinned to one exact tag, never `latest`, so a rebuild gets the same torch and CUDA:
#  - torch 2.9.0 is inside pyproject's `torch>=2.6,<=2.14.1` and torchvision 0.24 inside its range, so
#    `pip install .` keeps the image's CUDA torch instead of pulling another torch (a CPU one, or GBs
#    more); the build checks that below. The test machines run torch 2.14.1: bump BASE_IMAGE to a
#    2.14.1 tag when one with this CUDA line is published (or pass --build-arg BASE_IMAGE=...).
#  - CUDA 12.8 runs on every GPU from Volta (V100, T4) to Blackwell (RTX 50xx, B200); the host needs an
#    NVIDIA driver for CUDA 12.8 (R570 or newer) and the NVIDIA Container Toolkit.
#  - its Python is 3.11, which pyproject requires (>= 3.11).
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IMAGINE_CACHE=/cache \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    TRITON_CACHE_DIR=/cache/triton

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ffmpeg makes the videos (imageio-ffmpeg's bundled binary is only the fallback); DejaVu Sans
# draws the contact sheets' captions (bot/contact_sheet.py); gcc and libc6-dev let Triton build its
# kernel launchers, without which the worker's default torch.compile (`[worker] compile = "auto"`)
# stays off on the GPU (the runtime base image has no C compiler). Ubuntu's archive
# moves, so its package versions are not pinned (the base image tag pins the release).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg fonts-dejavu-core gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Only what the package needs (.dockerignore is an allowlist: no .env, no config.toml, no tests).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY bot ./bot

# Not editable, so /src can go. Then fail the build if pip swapped the CUDA torch for another one,
# or if clip / dall_e do not import (clip needs setuptools<81 for pkg_resources). `-I` (Python 3.11+:
# no working directory on sys.path): the installed engine and bot, not /src's, which go next.
RUN pip install --no-cache-dir . \
    && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'pip replaced the CUDA torch')" \
    && python -I -c "import clip, dall_e, engine.worker, bot.__main__" \
    && imagine-worker --help > /dev/null && imagine-bot --help > /dev/null \
    && rm -rf /src

# A non-root user; the model cache is a volume it owns (mount the same volume on every worker).
# torch.compile's kernels are cached there too: a recreated container skips the cold compile.
# /data: the working directory, so the embedded default's SQLite queue (`sqlite:///imagine-bot.db`,
# relative) is /data/imagine-bot.db, on the volume. Not IMAGINE_QUEUE_URL: it would override a
# config's [queue] url, and give an imagine-worker started without --queue a private SQLite queue.
RUN useradd --create-home --uid 10001 --user-group imagine \
    && mkdir -p /cache /config /data \
    && chown imagine:imagine /cache /data
USER 10001:10001
WORKDIR /data
VOLUME ["/cache", "/data"]

# imagine-worker --http-port 9100: /healthz and /metrics.
EXPOSE 9100

CMD ["imagine-bot", "--config", "/config/config.toml"]
