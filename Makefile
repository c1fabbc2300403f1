# One command each: `make test` installs everything and runs the tests; `make run` installs and
# starts the bot (DISCORD_TOKEN; ./config.toml when there is one, else the built-in defaults);
# `make imagine PROMPT="..."` renders locally; `make demo` renders with tiny random models (offline,
# no weights: noise-like pictures that check the install and the pipeline).
# The package is installed once into .venv and again only when pyproject.toml or this Makefile
# changes (the stamp .venv/.installed); `rm .venv/.installed` forces a reinstall.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := out/demo

.PHONY: help test run imagine demo install python-check system-deps test-deps bench
# `make` alone lists the commands: it used to run python-check (the first target) and say nothing.
.DEFAULT_GOAL := help

help:
	@echo 'make test                                  # install everything (venv, ffmpeg, redis) and run the tests'
	@echo 'DISCORD_TOKEN=... make run                 # install and run the bot (config.toml if there is one)'
	@echo 'make imagine PROMPT="a house by Escher"    # install and render locally, no Discord (out/<time>/)'
	@echo 'make demo                                  # offline check: tiny random models, 4 steps on the CPU'
	@echo 'make install                               # install only: the venv, the package and its test extras'
	@echo 'make bench                                 # install, then time the loop on full-size random models'
	@echo 'See README.md.'

# apt-get install $$missing (as root, else through sudo); without apt-get, say what is missing.
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	if command -v apt-get >/dev/null; then \
	  echo "installing$$missing"; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
	  echo "make: please install$$missing (or your distribution's equivalent), then run make again" >&2; exit 1; \
	fi

# Python 3.11+ (pyproject's requires-python), checked before anything is installed: the venv's
# Python once .venv exists, else $(PY).
python-check:
	@py="$(PY)"; [ -x $(BIN)/python ] && py=$(BIN)/python; \
	command -v "$$py" >/dev/null || { echo "make: $$py not found: imagine-bot needs Python 3.11 or newer (make PY=/path/to/python3.11 ...)" >&2; exit 1; }; \
	"$$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "make: imagine-bot needs Python 3.11 or newer; $$py is $$("$$py" -c 'import platform; print(platform.python_version())')." >&2; \
	  echo "      Install one and name it: make PY=python3.11 test  (an old .venv: rm -rf .venv first)" >&2; exit 1; }

# What the package needs at run time: ffmpeg (the videos), DejaVu Sans (the contact sheets'
# captions: Cyrillic, Greek) and, to create .venv on Debian/Ubuntu,
# pythonX.Y-venv (ensurepip). redis-server is for the tests only (test-deps): the bot never starts one.
system-deps: python-check
	@missing=""; \
	command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || missing="$$missing ffmpeg"; \
	[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing="$$missing fonts-dejavu-core"; \
	if [ ! -x $(BIN)/python ] && ! $(PY) -c 'import ensurepip' 2>/dev/null; then \
	  missing="$$missing python$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"; \
	fi; \
	if [ -n "$$missing" ]; then $(APT_INSTALL); fi

# The tests start throwaway redis-server processes, and make a TLS certificate with openssl.
test-deps:
	@missing=""; command -v redis-server >/dev/null || missing=" redis-server"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then $(APT_INSTALL); fi

$(VENV)/pyvenv.cfg: | system-deps
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile $(VENV)/pyvenv.cfg
	$(BIN)/pip install -q --upgrade pip
	# clip imports pkg_resources (gone in setuptools 81); torch pinned to the release tested here.
	$(BIN)/pip install -q "setuptools<81" wheel "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

test: system-deps test-deps $(STAMP)
	$(BIN)/python -m pytest

run: system-deps $(STAMP)
	$(BIN)/imagine-bot

# The prompt reaches imagine as typed, through the environment: "$(PROMPT)" in the recipe would
# let make expand its `$5` and the shell its quotes, backquotes and `$(...)`.
imagine: export IMAGINE_PROMPT := $(value PROMPT)
imagine: system-deps $(STAMP)
	$(BIN)/imagine "$$IMAGINE_PROMPT" --out out/$$(date +%Y%m%d-%H%M%S)

# Tiny random-weight CLIP and decoder (engine.random_models), 4 steps on the CPU, into out/demo/run.
# --trust-decoder: the decoder pickle and the CLIP TorchScript file are the ones made the line before.
demo: system-deps $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)/models
	$(BIN)/python -c "from engine import random_models as r; r.save_clip_torchscript(r.make_clip(), '$(DEMO)/models/tiny-clip.pt'); r.save_pickled_module(r.make_decoder(), '$(DEMO)/models/decoder.pkl')"
	$(BIN)/imagine "a house | by Escher:0.5" --out $(DEMO)/run --clip-model $(DEMO)/models/tiny-clip.pt \
	  --decoder $(DEMO)/models/decoder.pkl --trust-decoder --cache-dir $(DEMO)/cache \
	  --iterations 4 --frame-every 2 --grid 32 --cutn 2 --device cpu --no-progress

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_loop.py
