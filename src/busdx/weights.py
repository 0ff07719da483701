"""Pretrained weights: a registry of files, where to find them, and their checksums.

A named weights file is looked for, in order, in each folder of ``$BUSDX_WEIGHTS_DIR``
(``os.pathsep``-separated) and in the user cache ``$XDG_CACHE_HOME/busdx/weights`` (default
``~/.cache/busdx/weights``). A file with a download address is fetched into the cache when it
is found nowhere. Every file is checked against its sha256 before use, and loaded with
``torch.load(..., weights_only=True)``, which runs no code from the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from busdx.errors import UnknownModelError, WeightsError
from busdx.fileio import atomic_path, sha256_file

__all__ = [
    "WEIGHTS_ENV_VAR",
    "WeightSpec",
    "get_weight_spec",
    "load_state_dict",
    "resolve_weights_file",
    "weights_dirs",
]

WEIGHTS_ENV_VAR = "BUSDX_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightSpec:
    """One pretrained weights file and the input it expects (mean/std in 0..255 units)."""

    arch: str
    tag: str
    filename: str
    sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    license: str
    url: str | None = None  # direct download address, when the file is published as is

    @property
    def name(self) -> str:
        """Registry key, ``arch.tag``."""
        return f"{self.arch}.{self.tag}"


_SPECS = {
    spec.name: spec
    for spec in [
        WeightSpec(
            arch="vgg16",
            tag="imagenet",
            filename="vgg16_features_imagenet_rgb.pth",
            sha256="89712a0613d662f4d6f51b5d01667fff754e1b22b8169316b0b59584704f18a3",
            mean=(123.68, 116.779, 103.939),  # Caffe-style: RGB means, no std scaling
            std=(1.0, 1.0, 1.0),
            source="Oxford VGG16 ImageNet weights (Simonyan & Zisserman 2015) via Keras, "
            "convolutional trunk only, RGB channel order",
            license="CC BY 4.0",
        ),
    ]
}


def get_weight_spec(arch: str, tag: str) -> WeightSpec:
    """Look up ``arch.tag``; raise :class:`UnknownModelError` listing the known names."""
    spec = _SPECS.get(f"{arch}.{tag}")
    if spec is None:
        raise UnknownModelError(
            f"no pretrained weights {tag!r} for model {arch!r}; known: {', '.join(sorted(_SPECS))}"
        )
    return spec


def weights_dirs() -> list[Path]:
    """Folders searched for weights files, in order."""
    folders = [
        Path(p).expanduser() for p in os.environ.get(WEIGHTS_ENV_VAR, "").split(os.pathsep) if p
    ]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return [*folders, cache / "busdx" / "weights"]


def _download(spec: WeightSpec, target: Path) -> None:
    with atomic_path(target) as tmp:
        torch.hub.download_url_to_file(spec.url, str(tmp), progress=True)
        _verify(spec, tmp)


def _verify(spec: WeightSpec, path: Path) -> None:
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise WeightsError(
            f"{path} has sha256 {digest}, expected {spec.sha256} for {spec.name}; "
            "the file is corrupt or a different version: replace it"
        )


def resolve_weights_file(spec: WeightSpec, *, download: bool = True) -> Path:
    """Return the verified path of ``spec``'s file, downloading it to the cache if allowed."""
    for folder in weights_dirs():
        candidate = folder / spec.filename
        if candidate.is_file():
            _verify(spec, candidate)
            return candidate
    cache_target = weights_dirs()[-1] / spec.filename
    if download and spec.url:
        _download(spec, cache_target)
        return cache_target
    searched = ", ".join(str(d) for d in weights_dirs())
    raise WeightsError(
        f"weights file {spec.filename} ({spec.name}, sha256 {spec.sha256[:12]}...) not found in "
        f"{searched}; put it in one of these folders or point ${WEIGHTS_ENV_VAR} at its folder "
        "(or train with --weights none)"
    )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state_dict file safely (tensors only, no code execution)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise WeightsError(
            f"{path} is not a loadable PyTorch state_dict ({type(exc).__name__})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return state
