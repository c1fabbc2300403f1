# One command each: `make test` installs everything and runs the tests; `make run` installs and
# starts the bot (DISCORD_TOKEN; ./config.toml when there is one, else the built-in defaults);
# `make imagine PROMPT="..."` renders locally.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test run imagine install system-deps bench

system-deps:
	@missing=""; \
	command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || missing="$$missing ffmpeg"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	# clip imports pkg_resources (gone in setuptools 81); torch pinned to the release tested here.
	$(BIN)/pip install -q "setuptools<81" wheel "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[test]"

test: system-deps install
	$(BIN)/python -m pytest

run: system-deps install
	$(BIN)/imagine-bot

imagine: system-deps install
	$(BIN)/imagine "$(PROMPT)" --out out/$$(date +%Y%m%d-%H%M%S)

bench: install
	$(BIN)/python benchmarks/bench_loop.py
