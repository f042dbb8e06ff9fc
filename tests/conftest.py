"""Shared fixtures: offline, deterministic, small."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest
import torch

# FEDPROMPT_TEST_THREADS: CI runs the suite at two thread counts (every test must pass at
# any); default: at most 2, the CI machine's cores
torch.set_num_threads(int(os.environ.get("FEDPROMPT_TEST_THREADS", 0))
                      or min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """A data set from ../shared/data, or skip with a clear reason where it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared offline data sets live next to the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_backbone():
    from fedprompt.backbones import CLIPBackbone

    return CLIPBackbone.from_preset("clip-tiny", weights_seed=0)


@pytest.fixture(scope="session")
def llava():
    """The tiny offline LLaVA (llava-tiny, seeded weights)."""
    from fedprompt.backbones.llava import LlavaBackbone

    return LlavaBackbone.from_preset("llava-tiny", weights_seed=0)


@pytest.fixture(scope="session")
def color_qa():
    """Coloured squares asked "what color is the square?": 18 train, 6 test records."""
    from fedprompt.data.datasets import ArrayImages, DataSplits, ImageSet
    from fedprompt.data.synthetic import COLORS, coloured_squares
    from fedprompt.data.vqa import classification_qa

    pixels, labels = coloured_squares(24)
    names = list(COLORS)
    train = ImageSet("colors/train", ArrayImages(pixels[:18]), labels[:18], names)
    test = ImageSet("colors/test", ArrayImages(pixels[18:]), labels[18:], names)
    return classification_qa(DataSplits(train, test), "what color is the square? answer:")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path / "cache"))
