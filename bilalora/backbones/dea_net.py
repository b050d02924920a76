"""DEA-Net (Chen et al., IEEE TIP 2024), the reference dehazing backbone.

Module names follow the public release so that its plain-network state dicts
load unchanged (``level3_block1.pa.pa2.weight``, ``mix1.conv.weight``,
``down2.0.weight``, ...). Two forms share one class:

* ``DEANet(width, train_form=False)``: the plain inference network; every
  block's ``conv1`` is one 3x3 convolution.
* ``DEANet(width, train_form=True)``: the training form; every block's
  ``conv1`` is a :class:`~bilalora.backbones.deconv.DEConv` (five parallel
  difference convolutions). :func:`reparameterize` turns it into the plain
  form exactly.

The forward pass uses only ops that export cleanly to ONNX (reflect-padded
convs, global average pooling, channel interleave by stack + reshape).
"""

from __future__ import annotations

import torch
from torch import nn

from .deconv import DEConv

__all__ = ["DEANet", "DEBlock", "DEABlock", "CGAFusion", "reparameterize", "lift_plain_state"]


def _conv3x3(channels_in: int, channels_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=True)


def _first_conv(dim: int, train_form: bool) -> nn.Module:
    return DEConv(dim) if train_form else _conv3x3(dim, dim)


class SpatialAttention(nn.Module):
    """SA: 7x7 reflect conv over [channel mean, channel max].

    (N, C, H, W) -> (N, 1, H, W), unbounded logits.
    """

    def __init__(self):
        super().__init__()
        self.sa = nn.Conv2d(2, 1, 7, padding=3, padding_mode="reflect", bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.mean(x, dim=1, keepdim=True)
        peak = torch.amax(x, dim=1, keepdim=True)
        return self.sa(torch.cat([mean, peak], dim=1))


class ChannelAttention(nn.Module):
    """CA: global average pool -> 1x1 conv C->C/r -> ReLU -> 1x1 conv C/r->C.

    (N, C, H, W) -> (N, C, 1, 1), unbounded logits.
    """

    def __init__(self, dim: int, reduction: int = 8):
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.ca = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, padding=0, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, 1, padding=0, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ca(self.gap(x))


class PixelAttention(nn.Module):
    """PA: interleave x and a prior channel-wise, grouped 7x7 reflect conv, sigmoid.

    x: (N, C, H, W); prior: broadcastable to it. Returns (N, C, H, W) in (0, 1).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.pa2 = nn.Conv2d(2 * dim, dim, 7, padding=3, padding_mode="reflect", groups=dim, bias=True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        prior = prior.expand_as(x)
        # (N, C, 2, H, W) -> (N, 2C, H, W): channels x0, p0, x1, p1, ...
        interleaved = torch.stack([x, prior], dim=2).flatten(1, 2)
        return self.sigmoid(self.pa2(interleaved))


class CGAFusion(nn.Module):
    """Content-guided attention fusion of a skip feature x and a deep feature y.

    x, y: (N, C, H, W). Returns conv1x1(i + p*x + (1-p)*y) with i = x + y and
    p = sigmoid(PA(i, SA(i) + CA(i))) (the release applies sigmoid twice).
    """

    def __init__(self, dim: int, reduction: int = 8):
        super().__init__()
        self.sa = SpatialAttention()
        self.ca = ChannelAttention(dim, reduction)
        self.pa = PixelAttention(dim)
        self.conv = nn.Conv2d(dim, dim, 1, bias=True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        initial = x + y
        prior = self.sa(initial) + self.ca(initial)
        weight = self.sigmoid(self.pa(initial, prior))
        return self.conv(initial + weight * x + (1 - weight) * y)


class DEBlock(nn.Module):
    """Detail-enhanced block: r = conv2(relu(conv1(x)) + x); return r + x. Shape-preserving."""

    def __init__(self, dim: int, train_form: bool = False):
        super().__init__()
        self.conv1 = _first_conv(dim, train_form)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(self.act1(self.conv1(x)) + x)
        return residual + x


class DEABlock(nn.Module):
    """Detail-enhanced attention block: DE block with SA/CA/PA attention. Shape-preserving."""

    def __init__(self, dim: int, reduction: int = 8, train_form: bool = False):
        super().__init__()
        self.conv1 = _first_conv(dim, train_form)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(dim, dim)
        self.sa = SpatialAttention()
        self.ca = ChannelAttention(dim, reduction)
        self.pa = PixelAttention(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(self.act1(self.conv1(x)) + x)
        attention = self.pa(residual, self.sa(residual) + self.ca(residual))
        return residual * attention + x


class DEANet(nn.Module):
    """DEA-Net: a 3-level U-shaped dehazing network.

    Args:
        width: base channel count C (the release uses 32; tests use 8).
        train_form: build the DEConv training form instead of the plain network.

    Input: (N, 3, H, W) RGB in [0, 1], H and W multiples of 4 (use
    :func:`bilalora.padding.pad_to_multiple`). Output: (N, 3, H, W), the
    dehazed image, nominally in [0, 1] (not clamped: the release returns the
    last conv's output directly).
    """

    pad_multiple = 4

    def __init__(self, width: int = 32, train_form: bool = False):
        super().__init__()
        if width < 8 or width % 8:
            raise ValueError(f"DEA-Net width must be a positive multiple of 8, got {width}")
        c = width
        self.width = width
        self.train_form = train_form
        self.down1 = nn.Sequential(_conv3x3(3, c))
        self.down2 = nn.Sequential(_conv3x3(c, 2 * c, stride=2), nn.ReLU(True))
        self.down3 = nn.Sequential(_conv3x3(2 * c, 4 * c, stride=2), nn.ReLU(True))
        for i in range(1, 5):
            setattr(self, f"down_level1_block{i}", DEBlock(c, train_form))
        for i in range(1, 5):
            setattr(self, f"up_level1_block{i}", DEBlock(c, train_form))
        self.fe_level_2 = _conv3x3(2 * c, 2 * c)
        for i in range(1, 5):
            setattr(self, f"down_level2_block{i}", DEBlock(2 * c, train_form))
        for i in range(1, 5):
            setattr(self, f"up_level2_block{i}", DEBlock(2 * c, train_form))
        self.fe_level_3 = _conv3x3(4 * c, 4 * c)
        for i in range(1, 9):
            setattr(self, f"level3_block{i}", DEABlock(4 * c, 8, train_form))
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(4 * c, 2 * c, 3, stride=2, padding=1, output_padding=1), nn.ReLU(True)
        )
        self.up2 = nn.Sequential(nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1), nn.ReLU(True))
        self.up3 = nn.Sequential(_conv3x3(c, 3))
        self.mix1 = CGAFusion(4 * c, reduction=8)
        self.mix2 = CGAFusion(2 * c, reduction=4)

    def _blocks(self, prefix: str, count: int, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, count + 1):
            x = getattr(self, f"{prefix}{i}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_down1 = self._blocks("down_level1_block", 4, self.down1(x))
        x_down2 = self.down2(x_down1)
        x_down2_init = self._blocks("down_level2_block", 4, self.fe_level_2(x_down2))
        x_down3 = self.down3(x_down2_init)
        x_level3 = self._blocks("level3_block", 8, self.fe_level_3(x_down3))
        x_up1 = self._blocks("up_level2_block", 4, self.up1(self.mix1(x_down3, x_level3)))
        x_up2 = self._blocks("up_level1_block", 4, self.up2(self.mix2(x_down2, x_up1)))
        return self.up3(x_up2)


@torch.no_grad()
def reparameterize(model: DEANet) -> DEANet:
    """Return the plain DEA-Net equivalent to a training-form one (exact up to float rounding).

    Every ``DEConv`` is replaced by one 3x3 conv holding the summed kernel and
    bias; all other weights are copied. The input model is not modified.
    """
    plain = DEANet(model.width, train_form=False).to(next(model.parameters()).device)
    plain_state = plain.state_dict()
    source = model.state_dict()
    for key in plain_state:
        if key in source:
            plain_state[key] = source[key].clone()
    for name, module in model.named_modules():
        if isinstance(module, DEConv):
            weight, bias = module.merged_weight()
            plain_state[f"{name}.weight"] = weight.detach().clone()
            plain_state[f"{name}.bias"] = bias.detach().clone()
    plain.load_state_dict(plain_state)
    return plain.train(model.training)


def lift_plain_state(model: DEANet, plain_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training-form state dict computing the same function as a plain-network state dict.

    Each plain ``conv1`` kernel goes to its DEConv's vanilla branch (``conv1_5``)
    and the four difference branches start at zero, so the lifted model equals
    the plain one exactly and training can grow the difference branches from there.

    Args:
        model: a training-form :class:`DEANet` (gives the target keys and shapes).
        plain_state: state dict of the plain network of the same width.

    Returns:
        A state dict for ``model``; keys of ``plain_state`` that fit neither form are left
        out so that :func:`~bilalora.backbones.checkpoint.load_into` reports them.
    """
    target = model.state_dict()
    lifted: dict[str, torch.Tensor] = {}
    deconv_names = {name for name, module in model.named_modules() if isinstance(module, DEConv)}
    for key, value in plain_state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in deconv_names and leaf in ("weight", "bias"):
            lifted[f"{owner}.conv1_5.{leaf}"] = value
        else:
            lifted[key] = value
    for owner in deconv_names:
        for branch in ("conv1_1.conv", "conv1_2.conv", "conv1_3.conv", "conv1_4.conv"):
            for leaf in ("weight", "bias"):
                key = f"{owner}.{branch}.{leaf}"
                lifted[key] = torch.zeros_like(target[key])
    return lifted
