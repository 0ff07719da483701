"""The training loss: the classifier's, and the lesion mask's for a model with a mask head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LesionLoss", "Outputs"]

Outputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # logits, or (logits, mask logits)


class LesionLoss(nn.Module):
    """Binary cross-entropy of the class logits; with a mask head, plus ``mask_weight`` x
    (pixel binary cross-entropy + soft Dice loss) of the mask logits, averaged over the images
    that have a mask (``has_mask``; the others add nothing, and still train the classifier)."""

    def __init__(self, mask_weight: float = 1.0) -> None:
        super().__init__()
        self.mask_weight = mask_weight

    def forward(
        self, outputs: Outputs, labels: torch.Tensor, masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        if not isinstance(outputs, tuple):
            return F.binary_cross_entropy_with_logits(outputs.float(), labels)
        logits, mask_logits = outputs[0].float(), outputs[1].float()
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        pixel = F.binary_cross_entropy_with_logits(mask_logits, masks, reduction="none")
        probabilities = torch.sigmoid(mask_logits)
        overlap = (probabilities * masks).sum(dim=(1, 2))
        dice = (2 * overlap + 1) / (probabilities.sum(dim=(1, 2)) + masks.sum(dim=(1, 2)) + 1)
        per_image = pixel.mean(dim=(1, 2)) + 1 - dice
        return loss + self.mask_weight * (per_image * has_mask).sum() / has_mask.sum().clamp(min=1)
