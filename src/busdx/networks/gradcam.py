"""Grad-CAM: where in the image the model found the evidence for its decision.

Grad-CAM (Selvaraju et al., ICCV 2017) weights the feature maps of the backbone's last
convolution by the mean gradient of the decision score over each map, sums them and keeps the
positive part. Here the score is the logit for the predicted class (the malignancy logit when
the model says malignant, its negative when it says benign). Any registered backbone works: the
target is its last ``nn.Conv2d``. The map is upsampled to the image's original size (the model
sees the image resized to a square, so the mapping is a plain resize) and drawn over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from PIL import Image
from torch import nn

from busdx.errors import CheckpointError
from busdx.inference.predictor import Predictor
from busdx.networks.classifier import BinaryClassifier
from busdx.training.transforms import build_eval_transform

__all__ = ["Explanation", "explain_image", "grad_cam", "overlay_heatmap"]


def _target_end(backbone: nn.Sequential) -> int:
    """Index just past the last conv layer (and its activation, if one follows)."""
    indices = [i for i, layer in enumerate(backbone) if isinstance(layer, nn.Conv2d)]
    if not indices:
        raise ValueError("Grad-CAM needs a backbone with at least one nn.Conv2d")
    end = indices[-1] + 1
    activations = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU)
    return end + 1 if end < len(backbone) and isinstance(backbone[end], activations) else end


def grad_cam(
    model: BinaryClassifier, images: torch.Tensor, threshold_logit: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps (N, h, w) scaled to [0, 1] per image, and the logits (N,).

    ``threshold_logit`` is the logit at the decision threshold: images above it are explained
    as malignant, the others as benign.
    """
    target = _target_end(model.backbone)
    model.eval()
    with torch.no_grad():
        activations, tapped = model.run_backbone(
            images.contiguous(memory_format=torch.channels_last), 0, target
        )
    activations = activations.detach().requires_grad_(True)
    with torch.enable_grad():
        maps, more = model.run_backbone(activations, target)
        logits = model.classify(maps, tapped + more)
        sign = torch.where(logits.detach() >= threshold_logit, 1.0, -1.0)
        (gradients,) = torch.autograd.grad((sign * logits).sum(), activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * activations).sum(dim=1)).detach()
    peak = cams.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return cams / peak[:, None, None], logits.detach()


def overlay_heatmap(image: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """``cam`` (h, w in [0, 1]) resized to ``image`` and blended over it with a colour map."""
    heat = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255)).resize(
        image.size, Image.Resampling.BILINEAR
    )
    colours = matplotlib.colormaps["jet"](np.asarray(heat) / 255.0)[..., :3]
    weight = alpha * (np.asarray(heat, dtype=np.float32) / 255.0)[..., None] ** 0.5
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1 - weight) * base + weight * colours
    return Image.fromarray(np.uint8(np.clip(blended, 0, 1) * 255))


@dataclass
class Explanation:
    """A Grad-CAM map for one image, with the decision it explains."""

    cam: np.ndarray  # (h, w) in [0, 1], the backbone's last feature-map grid
    probability: float
    label: str
    overlay: Image.Image  # at the image's original size

    def peak(self, size: tuple[int, int]) -> tuple[float, float]:
        """(row, col) of the map's maximum in the coordinates of an image of ``size`` (w, h)."""
        row, col = np.unravel_index(np.argmax(self.cam), self.cam.shape)
        height, width = self.cam.shape
        return (row + 0.5) * size[1] / height, (col + 0.5) * size[0] / width


def explain_image(loaded: Predictor, image: Image.Image) -> Explanation:
    """Grad-CAM of the torch model for one RGB image (any size)."""
    if loaded.model is None:
        raise CheckpointError(
            f"Grad-CAM needs the PyTorch model, not {loaded.path.name}: pass the run directory "
            "or its model.pt"
        )
    tensor = build_eval_transform(loaded.preprocessing)(image)[None].to(loaded.device)
    threshold = min(max(loaded.threshold, 1e-6), 1 - 1e-6)
    threshold_logit = float(np.log(threshold / (1 - threshold))) * loaded.temperature
    members = getattr(loaded.model, "members", [loaded.model])  # an ensemble: mean of its maps
    maps = [grad_cam(member, tensor, threshold_logit) for member in members]
    cams = torch.stack([cam for cam, _ in maps]).mean(dim=0)
    logits = torch.stack([logit for _, logit in maps]).mean(dim=0)
    probability = float(loaded.probabilities(logits[0].cpu()))
    cam = cams[0].cpu().numpy()
    return Explanation(cam, probability, loaded.label(probability), overlay_heatmap(image, cam))
