"""Shared fixtures. Tests never need network, GPU or ../shared (fixtures skip without it)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """One torch thread: the suite runs on 2-core machines, often beside other work,
    where two spinning OpenMP threads per process make small forwards many times slower."""
    import torch

    torch.set_num_threads(1)


def _shared_root() -> Path:
    return Path(os.environ.get("BILALORA_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $BILALORA_SHARED/data); skips the test when it is absent."""
    folder = _shared_root() / "data"
    if not folder.is_dir():
        pytest.skip(f"shared data not present at {folder}")
    return folder


@pytest.fixture(scope="session")
def shared_metrics() -> Path:
    """../shared/metrics; skips the test when it is absent."""
    folder = _shared_root() / "metrics"
    if not folder.is_dir():
        pytest.skip(f"shared metrics not present at {folder}")
    return folder


@pytest.fixture
def tiny_dea():
    """A width-8 plain DEA-Net with fixed random weights, in eval mode."""
    import torch

    from bilalora import backbones

    torch.manual_seed(0)
    return backbones.create("dea-net-t").eval()


def write_hazy_images(folder: Path, count: int = 8, size: tuple[int, int] = (72, 96), seed: int = 0) -> list[Path]:
    """Write ``count`` small synthetic hazy RGB PNGs (textured scene + airlight) and return their paths."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    paths = []
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    for index in range(count):
        scene = np.stack(
            [
                0.5 + 0.4 * np.sin(2 * np.pi * (xx * rng.uniform(2, 6) + rng.uniform())),
                0.5 + 0.4 * np.cos(2 * np.pi * (yy * rng.uniform(2, 6) + rng.uniform())),
                rng.uniform(0.2, 0.8) * np.ones_like(xx),
            ],
            axis=-1,
        )
        scene += rng.normal(0, 0.05, scene.shape)
        transmission = np.clip(0.35 + 0.5 * (1 - yy)[..., None] * rng.uniform(0.5, 1.0), 0.1, 1.0)
        hazy = scene * transmission + 0.85 * (1 - transmission)
        image = (np.clip(hazy, 0, 1) * 255).round().astype(np.uint8)
        path = folder / f"hazy_{index:02d}.png"
        cv2.imwrite(str(path), image[..., ::-1])
        paths.append(path)
    return paths


@pytest.fixture
def hazy_folder(tmp_path) -> Path:
    """A folder of 8 small synthetic hazy images made by the test."""
    folder = tmp_path / "frames"
    write_hazy_images(folder)
    return folder


_NO_TORCH = (
    "import builtins\n"
    "real = builtins.__import__\n"
    "def guard(name, *a, **k):\n"
    "    if name == 'torch' or name.startswith('torch.'): raise ImportError('no torch here')\n"
    "    return real(name, *a, **k)\n"
    "builtins.__import__ = guard\n"
)


def run_without_torch(code: str, timeout: float = 120):
    """Run ``code`` in a fresh Python where every ``import torch`` fails; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _NO_TORCH + code], capture_output=True, text=True, timeout=timeout)
