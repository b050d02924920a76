"""benchmarks/gpu_session.sh: the dry run checks what the remote GPU runner allows (64 MiB in, <= 8 files out,
a 60 s margin before a 9-minute command) without a GPU, and the script writes only the files it declares."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None,
                                reason="needs bash and git")


def _dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    carry = tmp_path / "carry"
    carry.mkdir(exist_ok=True)
    environment = {**os.environ, "GPU_SESSION_CARRY": str(carry), **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_dry_run_says_what_it_would_run_within_the_limits(tmp_path):
    result = _dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    steps = ("setup", "timing", "adapt", "bench", "trt-build", "trt-refit", "trt-int8", "trt-run", "pretrain", "pack")
    for step in steps:
        assert re.search(rf"^  {step}\s", out, re.M), step
    assert "files in $OUT: 5" in out and "of at most 8" in out
    margin = int(re.search(r"margin (\d+)s before the 540s limit", out).group(1))
    assert margin >= 60
    assert "dry run: OK" in out and "timeout_s=560" in out


def test_dry_run_fails_over_the_carry_limit(tmp_path):
    carry = tmp_path / "carry"
    carry.mkdir()
    with open(carry / "big.bin", "wb") as handle:  # sparse: 65 MiB apparent size, no disk used
        handle.truncate(65 * 2**20)
    result = _dry_run(tmp_path)
    assert result.returncode == 1
    assert "over the 64 MiB" in result.stdout and "dry run: FAILED" in result.stdout


def test_dry_run_fails_when_the_margin_is_gone(tmp_path):
    result = _dry_run(tmp_path, GPU_SESSION_LIMIT_S="360")
    assert result.returncode == 1
    assert re.search(r"the measurement steps alone overrun the limit by \d+s", result.stdout)
    result = _dry_run(tmp_path, GPU_SESSION_LIMIT_S="420")  # 20 s would be left: pretraining is skipped, not a failure
    assert result.returncode == 0 and "pretrain" in result.stdout and "would be skipped: under 60s" in result.stdout
    result = _dry_run(tmp_path, GPU_SESSION_LIMIT_S="600")
    assert result.returncode == 1 and "keep LIMIT_S <= 540" in result.stdout


def test_the_script_writes_only_the_files_it_declares():
    text = SCRIPT.read_text()
    declared = set(re.search(r"^OUT_FILES=\((.*)\)$", text, re.M).group(1).split())
    written = set(re.findall(r'"\$OUT/([A-Za-z0-9_.-]+)"', text))
    written |= {"dea-net-w32.safetensors"} if 'target="$OUT/$file"' in text else set()
    written -= {".results.tar.gz"}  # renamed onto results.tar.gz
    assert written <= declared, written - declared
    assert len(declared) <= 8


@pytest.mark.parametrize("name", ["gpu_session.sh", "gpu_pretrain.sh", "device_setup.sh", "e2e_real.sh"])
def test_scripts_parse(name):
    result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
