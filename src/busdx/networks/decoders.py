"""Lesion-mask decoders of the mask head: backbone feature maps (finest first) -> one mask
logit per input pixel (``model.mask_decoder``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MaskDecoder", "UNetDecoder", "build_decoder"]


class MaskDecoder(nn.Module):
    """Lesion-mask logits from backbone feature maps, finest first (a feature pyramid, as in
    Lin et al. 2017): each map projected to ``width`` channels, the coarser ones upsampled and
    added to the finer, then a 3x3 conv and a 1x1 conv to one logit per pixel, upsampled
    bilinearly to the input's size."""

    def __init__(self, channels: list[int], width: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.lateral[-1](maps[-1])
        for lateral, finer in zip(self.lateral[-2::-1], maps[-2::-1], strict=True):
            x = F.interpolate(x, size=finer.shape[-2:], mode="bilinear") + lateral(finer)
        return F.interpolate(self.fuse(x), size=size, mode="bilinear").squeeze(1)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))  # fmt: skip


class UNetDecoder(nn.Module):
    """Lesion-mask logits from backbone feature maps at strides 2 to 32, finest first, in the
    manner of U-Net's expanding path (Ronneberger et al. 2015): the coarsest map reduced to
    ``widths[0]`` channels, then at each finer stride upsampled, concatenated with that
    stride's map and refined by two 3x3 conv-BN-ReLU, down to stride 2; a 1x1 conv gives one
    logit per pixel, upsampled bilinearly to the input's size (``model.mask_decoder: unet``).
    Finer than :class:`MaskDecoder` (stride 2, not 4) and with convolutions at every scale."""

    def __init__(self, channels: list[int], widths: tuple[int, ...] = (96, 64, 32, 16)) -> None:
        super().__init__()
        if len(widths) != len(channels) - 1:
            raise ValueError(f"{len(channels)} maps need {len(channels) - 1} widths")
        self.reduce = nn.Conv2d(channels[-1], widths[0], 1)
        blocks, cin = [], widths[0]
        for skip, width in zip(channels[-2::-1], widths, strict=True):
            blocks.append(nn.Sequential(_conv_bn_relu(cin + skip, width),
                                        _conv_bn_relu(width, width)))  # fmt: skip
            cin = width
        self.blocks = nn.ModuleList(blocks)
        self.logit = nn.Conv2d(cin, 1, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.reduce(maps[-1])
        for block, skip in zip(self.blocks, maps[-2::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear")
            x = block(torch.cat([x, skip], dim=1))
        return F.interpolate(self.logit(x), size=size, mode="bilinear").squeeze(1)


def build_decoder(kind: str, channels: list[int]) -> MaskDecoder | UNetDecoder:
    """The decoder ``model.mask_decoder`` names, for maps of these channel counts (finest
    first; ``unet`` takes one more, at stride 2)."""
    return UNetDecoder(channels) if kind == "unet" else MaskDecoder(channels)
