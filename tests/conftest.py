"""Shared fixtures: tiny tokenizer and tiny diffusers-saved pipeline folders (built once per session)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is faster and steadier than two
logging.getLogger("lcmkit").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.tiny_tokenizer import make_tiny_clip_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    make_tiny_clip_tokenizer(save_dir=folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """name -> diffusers-saved pipeline folder, for every spec in helpers.tiny_models.SPECS."""
    from helpers.tiny_models import SPECS, save_diffusers_pipeline

    return {
        name: save_diffusers_pipeline(spec, tmp_path_factory.mktemp(f"pipe_{name}"), tokenizer_dir)
        for name, spec in SPECS.items()
    }


@pytest.fixture(autouse=True, scope="session")
def probe_cache(tmp_path_factory: pytest.TempPathFactory):
    """Probe decisions (`lcmkit.nn.probe`) go to a folder of this session, never to ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("probe-cache")
    previous = os.environ.get("LCMKIT_PROBE_CACHE")
    os.environ["LCMKIT_PROBE_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("LCMKIT_PROBE_CACHE", None)
    else:
        os.environ["LCMKIT_PROBE_CACHE"] = previous
