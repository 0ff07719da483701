"""Dataset audit: what is in a folder, what is broken, and which images are (near-)duplicates.

Exact duplicates share a content sha256. Near-duplicates share a perceptual hash (pHash: the
signs of the 8x8 lowest DCT frequencies of a 32x32 grayscale thumbnail, against their median)
within ``max_distance`` of 63 bits, comparing each image also with the mirror image of the other;
that survives resizing, re-encoding, small crops and rotations, and horizontal flips.
Images connected by any duplicate pair form a group: a group must never straddle two splits.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from busdx.data.datasets import LabelledDataset, Sample
from busdx.data.dicom import is_dicom_file
from busdx.data.imaging import load_image
from busdx.fileio import atomic_write_text, write_json
from busdx.layout import AUDIT_HTML, AUDIT_JSON
from busdx.templating import render

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "AuditResult",
    "DuplicatePair",
    "audit_dataset",
    "duplicate_groups",
    "find_duplicate_pairs",
    "perceptual_hash",
    "write_audit",
]

DEFAULT_MAX_DISTANCE = 10  # of 63 bits; chosen where BUSI's distance histogram has its valley


def perceptual_hash(image: Image.Image) -> int:
    """63-bit pHash of an image as a Python int."""
    from scipy.fft import dctn  # 0.2 s to import: only when images are hashed

    thumb = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=float)
    low = dctn(thumb, norm="ortho")[:8, :8].ravel()[1:]  # drop the DC term (mean brightness)
    bits = low > np.median(low)
    return int(np.packbits(np.r_[False, bits]).view(">u8")[0])


@dataclass(frozen=True)
class DuplicatePair:
    """Two images that are exact (distance 0, same bytes) or near duplicates."""

    first: int
    second: int
    distance: int
    exact: bool


def find_duplicate_pairs(
    hashes: np.ndarray, mirrored: np.ndarray, sha256s: list[str], *, max_distance: int
) -> list[DuplicatePair]:
    """All pairs i < j whose hash distance (direct or mirrored) is at most ``max_distance``."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    mirrored = np.asarray(mirrored, dtype=np.uint64)
    pairs = []
    for i in range(len(hashes) - 1):
        rest = hashes[i + 1 :]
        direct = np.bitwise_count(rest ^ hashes[i])
        flipped = np.bitwise_count(rest ^ mirrored[i])
        distance = np.minimum(direct, flipped)
        for offset in np.flatnonzero(distance <= max_distance):
            j = i + 1 + int(offset)
            pairs.append(DuplicatePair(i, j, int(distance[offset]), sha256s[i] == sha256s[j]))
    return pairs


def duplicate_groups(n: int, pairs: list[DuplicatePair]) -> list[int]:
    """Group id per image: connected components of the duplicate graph (union-find)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair in pairs:
        parent[root(pair.first)] = root(pair.second)
    roots = [root(i) for i in range(n)]
    renumber = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return [renumber[r] for r in roots]


@dataclass
class AuditResult:
    """Everything the audit found; ``to_dict`` is the JSON report."""

    root: Path
    layout: str
    samples: list[Sample]
    sizes: Counter
    modes: Counter
    unreadable: list[str]
    pairs: list[DuplicatePair]
    groups: list[int]
    max_distance: int

    def _describe(self, pair: DuplicatePair) -> dict[str, Any]:
        a, b = self.samples[pair.first], self.samples[pair.second]
        return {
            "a": a.relpath,
            "b": b.relpath,
            "distance": pair.distance,
            "exact": pair.exact,
            "split_a": a.split,
            "split_b": b.split,
            "class_a": a.class_folder,
            "class_b": b.class_folder,
        }

    @property
    def cross_split_pairs(self) -> list[DuplicatePair]:
        """Duplicate pairs whose two images are in different splits: leakage."""
        return [
            p for p in self.pairs if self.samples[p.first].split != self.samples[p.second].split
        ]

    @property
    def label_conflicts(self) -> list[DuplicatePair]:
        """Duplicate pairs filed under different class folders."""
        return [
            p
            for p in self.pairs
            if self.samples[p.first].class_folder != self.samples[p.second].class_folder
        ]

    def summary(self) -> dict[str, Any]:
        group_sizes = Counter(Counter(self.groups).values())
        exact = [p for p in self.pairs if p.exact]
        in_groups = sum(size * count for size, count in group_sizes.items() if size > 1)
        return {
            "images": len(self.samples),
            "classes": dict(Counter(s.class_folder for s in self.samples)),
            "splits": dict(Counter(s.split or "unsplit" for s in self.samples)),
            "unreadable": len(self.unreadable),
            "exact_duplicate_pairs": len(exact),
            "near_duplicate_pairs": len(self.pairs) - len(exact),
            "images_in_duplicate_groups": in_groups,
            "duplicate_groups": sum(c for size, c in group_sizes.items() if size > 1),
            "largest_group": max(group_sizes) if group_sizes else 0,
            "cross_split_pairs": len(self.cross_split_pairs),
            "label_conflict_pairs": len(self.label_conflicts),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": str(self.root),
            "layout": self.layout,
            "max_distance": self.max_distance,
            "summary": self.summary(),
            "image_sizes": {f"{w}x{h}": n for (w, h), n in self.sizes.most_common()},
            "image_modes": dict(self.modes.most_common()),
            "unreadable_files": self.unreadable,
            "pairs": [self._describe(p) for p in self.pairs],
            "groups": {s.relpath: g for s, g in zip(self.samples, self.groups, strict=True)},
        }


def audit_dataset(
    dataset: LabelledDataset, *, max_distance: int = DEFAULT_MAX_DISTANCE, progress: bool = True
) -> AuditResult:
    """Hash every image of ``dataset`` and find its duplicate pairs and groups."""
    sizes: Counter = Counter()
    modes: Counter = Counter()
    hashes, mirrored = [], []
    for sample in tqdm(dataset.samples, desc="audit", unit="img", disable=not progress):
        image = load_image(sample.path)
        if is_dicom_file(sample.path):  # size of the B-mode region read; mode "DICOM"
            sizes[image.size] += 1
            modes["DICOM"] += 1
        else:
            with Image.open(sample.path) as raw:
                sizes[raw.size] += 1
                modes[raw.mode] += 1
        hashes.append(perceptual_hash(image))
        mirrored.append(perceptual_hash(ImageOps.mirror(image)))
    pairs = find_duplicate_pairs(
        np.array(hashes, dtype=np.uint64),
        np.array(mirrored, dtype=np.uint64),
        [s.sha256 for s in dataset.samples],
        max_distance=max_distance,
    )
    groups = duplicate_groups(len(dataset.samples), pairs)
    return AuditResult(
        dataset.root,
        dataset.layout,
        dataset.samples,
        sizes,
        modes,
        list(dataset.skipped),
        pairs,
        groups,
        max_distance,
    )


def _thumbnail(path: Path, size: int = 160) -> str:
    image = load_image(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _html_report(result: AuditResult, max_pairs: int) -> str:
    ordered = sorted(
        result.pairs,
        key=lambda p: (
            result.samples[p.first].split == result.samples[p.second].split,
            result.samples[p.first].class_folder == result.samples[p.second].class_folder,
            p.distance,
        ),
    )
    pairs = []
    for pair in ordered[:max_pairs]:
        info = result._describe(pair)
        flags = ["LEAK: different splits"] if info["split_a"] != info["split_b"] else []
        flags += ["LABEL CONFLICT"] if info["class_a"] != info["class_b"] else []
        images = [
            {"thumbnail": _thumbnail(result.samples[i].path), "relpath": result.samples[i].relpath,
             "split": result.samples[i].split or ""}
            for i in (pair.first, pair.second)
        ]  # fmt: skip
        kind = "exact" if pair.exact else f"near (distance {pair.distance})"
        pairs.append({"kind": kind, "flags": flags, "images": images})
    return render(
        "audit.html.j2", root=str(result.root), layout=result.layout, summary=result.summary(),
        max_distance=result.max_distance, pairs=pairs, more=len(result.pairs) - len(pairs),
    )  # fmt: skip


def write_audit(result: AuditResult, out_dir: Path, *, max_pairs: int = 200) -> None:
    """Write ``audit.json`` and a self-contained ``audit.html`` with thumbnails of each pair."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / AUDIT_JSON, result.to_dict())
    atomic_write_text(out_dir / AUDIT_HTML, _html_report(result, max_pairs))
