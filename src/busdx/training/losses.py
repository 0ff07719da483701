"""The training loss: the classifier's, and the lesion mask's for a model with a mask head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LesionLoss", "Outputs", "boundary_band"]

Outputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # logits, or (logits, mask logits)


def boundary_band(masks: torch.Tensor, width: int) -> torch.Tensor:
    """1 on the pixels within ``width // 2`` of a mask's edge (inside or out), else 0: the
    mask dilated minus the mask eroded, by a ``width`` x ``width`` square (N x H x W)."""
    grown = F.max_pool2d(masks[:, None], width, stride=1, padding=width // 2)
    shrunk = -F.max_pool2d(-masks[:, None], width, stride=1, padding=width // 2)
    return (grown - shrunk)[:, 0]


class LesionLoss(nn.Module):
    """Binary cross-entropy of the class logits; with a mask head, plus ``mask_weight`` x
    (pixel binary cross-entropy + soft Dice loss) of the mask logits, averaged over the images
    that have a mask (``has_mask``; the others add nothing, and still train the classifier).

    ``boundary_weight`` makes the outline's border count more: each pixel's cross-entropy
    within ``boundary_width // 2`` pixels of the reader's edge is weighted ``1 +
    boundary_weight`` (a boundary-weighted loss, as U-Net's weight map; 0: off)."""

    def __init__(
        self, mask_weight: float = 1.0, boundary_weight: float = 0.0, boundary_width: int = 7
    ) -> None:
        super().__init__()
        self.mask_weight = mask_weight
        self.boundary_weight, self.boundary_width = boundary_weight, boundary_width

    def forward(
        self, outputs: Outputs, labels: torch.Tensor, masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        if not isinstance(outputs, tuple):
            return F.binary_cross_entropy_with_logits(outputs.float(), labels)
        logits, mask_logits = outputs[0].float(), outputs[1].float()
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        pixel = F.binary_cross_entropy_with_logits(mask_logits, masks, reduction="none")
        if self.boundary_weight:
            pixel = pixel * (1 + self.boundary_weight * boundary_band(masks, self.boundary_width))
        probabilities = torch.sigmoid(mask_logits)
        overlap = (probabilities * masks).sum(dim=(1, 2))
        dice = (2 * overlap + 1) / (probabilities.sum(dim=(1, 2)) + masks.sum(dim=(1, 2)) + 1)
        per_image = pixel.mean(dim=(1, 2)) + 1 - dice
        return loss + self.mask_weight * (per_image * has_mask).sum() / has_mask.sum().clamp(min=1)
