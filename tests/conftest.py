"""Shared fixtures: tiny random-weight models in OpenAI's file formats, loaded by the real loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from engine import models as engine_models
from engine import random_models


@dataclass(frozen=True)
class ModelFiles:
    clip_torchscript: Path     # like OpenAI's ViT-B-32.pt
    clip_state_dict: Path
    decoder_pickle: Path       # like OpenAI's decoder.pkl
    encoder_pickle: Path       # like OpenAI's encoder.pkl
    cache_dir: Path


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory) -> ModelFiles:
    root = tmp_path_factory.mktemp("tiny-models")
    clip_model = random_models.make_clip(seed=0)
    return ModelFiles(
        clip_torchscript=random_models.save_clip_torchscript(clip_model, root / "tiny-clip.pt"),
        clip_state_dict=random_models.save_clip_state_dict(clip_model, root / "tiny-clip-state.pt"),
        decoder_pickle=random_models.save_pickled_module(random_models.make_decoder(seed=0), root / "decoder.pkl"),
        encoder_pickle=random_models.save_pickled_module(random_models.make_encoder(seed=0), root / "encoder.pkl"),
        cache_dir=root / "cache",
    )


@pytest.fixture(scope="session")
def tiny_models(tiny_model_files) -> engine_models.Models:
    """Tiny CLIP + dVAE (decoder and encoder) on the CPU, through the same loaders as OpenAI's files."""
    f = tiny_model_files
    return engine_models.load_models(
        str(f.clip_torchscript), str(f.decoder_pickle), device="cpu", cache_dir=f.cache_dir,
        trust_decoder=True, encoder=str(f.encoder_pickle),
    )
