"""CLI: help, sites (registry name and module:factory), info, one-line errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from typer.testing import CliRunner

from bilalora.cli.app import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("sites", "info"):
        assert command in result.output


def test_sites_default_and_all():
    result = runner.invoke(app, ["sites", "--backbone", "dea-net-t", "--size", "64x64"])
    assert result.exit_code == 0, result.output
    assert "16 sites" in result.output and "level3_block8" in result.output
    assert "up_level1_block1" not in result.output
    flat = " ".join(result.output.split())
    assert ("--objective prior searches 4 of them by default: down_level1_block1, down_level1_block2, "
            "down_level1_block3, down_level1_block4") in flat
    result = runner.invoke(app, ["sites", "--backbone", "dea-net-t", "--all", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert "up_level1_block1" in result.output and "mix1" in result.output


def test_sites_width32_counts():
    result = runner.invoke(app, ["sites", "--backbone", "dea-net"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "3,653,377 parameters" in result.output
    assert "405,504" in result.output  # rank-8 LoRA over the 16 default sites
    assert "GFLOPs" in result.output and "GMACs" in result.output


def test_sites_with_module_factory(tmp_path, monkeypatch):
    (tmp_path / "tiny_unet.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Block(nn.Module):
                def __init__(self, c):
                    super().__init__()
                    self.conv_a = nn.Conv2d(c, c, 3, padding=1)
                    self.conv_b = nn.Conv2d(c, c, 3, padding=1)
                def forward(self, x):
                    return x + self.conv_b(torch.relu(self.conv_a(x)))

            class TinyUNet(nn.Module):
                def __init__(self, c=8):
                    super().__init__()
                    self.stem = nn.Conv2d(3, c, 3, padding=1)
                    self.enc = Block(c)
                    self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
                    self.mid = Block(c)
                    self.up = nn.Upsample(scale_factor=2)
                    self.dec = Block(c)
                    self.head = nn.Conv2d(c, 3, 1)
                def forward(self, x):
                    e = self.enc(self.stem(x))
                    return self.head(self.dec(self.up(self.mid(self.down(e))) + e))

            def build(width: int = 8):
                return TinyUNet(width)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["sites", "--backbone", "tiny_unet:build", "--size", "32x32"])
    assert result.exit_code == 0, result.output
    for name in ("enc", "mid", "dec", "stem", "head"):
        assert name in result.output


def test_bad_backbone_is_one_line():
    result = runner.invoke(app, ["sites", "--backbone", "nope"])
    assert result.exit_code == 2
    assert "unknown backbone 'nope'" in result.output
    assert "Traceback" not in result.output


def test_missing_weights_is_one_line(tmp_path):
    result = runner.invoke(app, ["sites", "--backbone", "dea-net-t", "--weights", str(tmp_path / "no.pth")])
    assert result.exit_code == 2 and "weights file not found" in result.output


def test_info():
    result = runner.invoke(app, ["info"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for word in ("torch", "onnxruntime", "tensorrt", "CUDA", "default backbone"):
        assert word in result.output
    if "not installed (pip" in result.output:
        assert "bilalora[trt]" in result.output


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "bilalora.cli.app", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "adapt" in result.stdout.lower()
