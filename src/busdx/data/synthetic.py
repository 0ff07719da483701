"""Synthetic breast-ultrasound-like images, for the demo and for tests that must run anywhere.

Benign lesions tend to be dark, smooth, oval masses wider than tall; malignant ones dark masses
with spiculated (star-like) margins, more often taller than wide, with posterior acoustic
shadowing. The two overlap, so the task is not trivially separable. Both sit in multiplicative
speckle over layered tissue with a random texture. No real patient data is involved.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "decompression_bomb_png",
    "make_lesion_image",
    "not_a_scan_images",
    "ultrasound_dicom",
    "write_synthetic_dataset",
]


SPECKLE_SIGMA = 0.8  # pixels: the point-spread function that makes speckle grains


def _speckle_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Layered tissue with a random smooth texture: every image has its own anatomy."""
    y = np.linspace(0, 1, size)[:, None]
    layers = 0.4 + 0.12 * np.sin(2 * np.pi * (rng.uniform(2, 4) * y + rng.uniform(0, 1))) + 0.1 * y
    coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
    texture = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=float) / 255
    tissue = layers + 0.35 * (texture - 0.5) + 0.06 * rng.standard_normal((size, size))
    return np.clip(tissue, 0.05, 1.0)


def _point_spread(image: np.ndarray) -> np.ndarray:
    """The scanner's point-spread function: a Gaussian blur that makes speckle grains of a few
    pixels, spatially correlated as real speckle is."""
    from scipy.ndimage import gaussian_filter  # imported here: scipy.ndimage is slow to import

    return gaussian_filter(image, SPECKLE_SIGMA)


def make_lesion_image(
    malignant: bool, *, size: int = 256, seed: int | None = None
) -> tuple[Image.Image, tuple[int, int], Image.Image]:
    """One 8-bit grayscale image, the (row, col) centre of its lesion and its lesion mask (a
    1-bit image, white on the lesion).

    Irregularity is drawn from overlapping ranges (benign 0-0.5, malignant 0.4-1), so some
    benign lesions look suspicious and some cancers look smooth, as in real scans.
    """
    rng = np.random.default_rng(seed)
    image = _speckle_background(rng, size)
    cy, cx = (int(rng.uniform(0.35, 0.65) * size) for _ in range(2))
    yy, xx = np.mgrid[:size, :size]
    dy, dx = (yy - cy) / size, (xx - cx) / size
    angle = np.arctan2(dy, dx)
    base = rng.uniform(0.07, 0.12)
    irregularity = rng.uniform(0.4, 1.0) if malignant else rng.uniform(0.0, 0.5)
    spikes = rng.integers(6, 14)
    edge = base * (
        1 + 0.45 * irregularity * np.abs(np.sin(spikes * angle / 2 + rng.uniform(0, np.pi))) ** 3
    )
    tall = rng.uniform() < (0.1 + 0.6 * irregularity)  # taller-than-wide is suspicious
    stretch_x, stretch_y = (0.8, 1.2) if tall else (rng.uniform(1.2, 1.5), rng.uniform(0.7, 0.9))
    lesion = np.hypot(dx / stretch_x, dy / stretch_y) < edge
    shadow = (yy > cy) & (np.abs(xx - cx) < base * size * 0.8)
    image[shadow] *= 1 - 0.45 * irregularity  # posterior acoustic shadowing
    image[lesion] = 0.08 + 0.05 * rng.random(lesion.sum())
    image = _point_spread(image * rng.rayleigh(0.8, (size, size)))  # multiplicative speckle
    pixels = np.clip(image / max(image.max(), 1e-6) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L"), (cy, cx), Image.fromarray(lesion)


def write_synthetic_dataset(
    root: str | Path, *, n_per_class: int = 40, seed: int = 0, masks: bool = False
) -> Path:
    """Write ``root/benign/*.png`` and ``root/malignant/*.png`` (the BUSI layout), and with
    ``masks`` each image's lesion mask beside it (``<image>_mask.png``, as in BUSI)."""
    root = Path(root)
    for label, name in enumerate(("benign", "malignant")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            image, _, mask = make_lesion_image(
                bool(label), seed=seed * 100_000 + label * 10_000 + i
            )
            image.save(folder / f"{name} ({i + 1}).png")
            if masks:
                mask.save(folder / f"{name} ({i + 1})_mask.png")
    return root


def _doppler_overlay(rng: np.random.Generator) -> Image.Image:
    """A synthetic scan with a colour-flow box over it (red and blue flow)."""
    scan = np.asarray(make_lesion_image(False, seed=int(rng.integers(1 << 30)))[0].convert("RGB"))
    scan = scan.copy()
    y, x = np.ogrid[:256, :256]
    flow = np.hypot(y - 120, x - 128) < 40
    scan[flow & (x < 128)] = (200, 30, 30)
    scan[flow & (x >= 128)] = (30, 60, 210)
    return Image.fromarray(scan)


def _text_screenshot(rng: np.random.Generator) -> Image.Image:
    """Black text on a white page, as a screenshot or a scanned form."""
    from PIL import ImageDraw

    page = Image.new("L", (400, 300), 255)
    draw = ImageDraw.Draw(page)
    for row in range(12):
        words = " ".join("".join(rng.choice(list("abcdefghij"), 5)) for _ in range(6))
        draw.text((10, 10 + 24 * row), words, fill=0)
    return page


def _smooth_radiograph(rng: np.random.Generator, *, mammogram: bool) -> Image.Image:
    """A smooth bright body on a dark background, like a radiograph or a mammogram."""
    y, x = np.mgrid[:320, :256] / 256.0
    if mammogram:  # a half-disc of breast tissue against the image edge
        body = np.clip(1 - np.hypot(x / 0.8, (y - 0.62) / 0.7), 0, 1) ** 0.3
    else:  # a chest: two lung fields darker than the mediastinum
        body = 0.8 - 0.5 * np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) / 0.02)
        body -= 0.5 * np.exp(-((x - 0.7) ** 2 + (y - 0.6) ** 2) / 0.02)
    coarse = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8))
    texture = np.asarray(coarse.resize((256, 320), Image.Resampling.BICUBIC), dtype=float) / 255
    return Image.fromarray(np.clip((body * (0.85 + 0.3 * texture)) * 230, 0, 255).astype(np.uint8))


def not_a_scan_images(seed: int = 0) -> dict[str, Image.Image]:
    """Synthetic images that are not B-mode breast ultrasound scans, in the modes files come
    in: noise (grey, RGB, palette, CMYK, 32-bit float, 16-bit), uniform and near-uniform
    images, bilevel images, gradients, a text page, colour-flow Doppler over a scan, and smooth
    radiograph- and mammogram-like images. Each should be called not a scan."""
    rng = np.random.default_rng(seed)
    noise = (rng.random((256, 256)) * 255).astype(np.uint8)
    rgb_noise = Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8))
    near_white = (65535 - rng.random((256, 256)) * 2000).astype(np.uint16)
    gradient = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    return {
        "noise-grey": Image.fromarray(noise),
        "noise-rgb": rgb_noise,
        "noise-palette": rgb_noise.convert("P"),
        "noise-cmyk": rgb_noise.convert("CMYK"),
        "noise-float": Image.fromarray(rng.random((256, 256)).astype(np.float32), mode="F"),
        "noise-gaussian": Image.fromarray(
            np.clip(rng.normal(90, 50, (256, 256)), 0, 255).astype(np.uint8)
        ),
        "near-white-16bit": Image.fromarray(near_white),
        "bilevel": Image.fromarray(rng.random((256, 256)) > 0.5).convert("1"),
        "black": Image.new("L", (256, 256), 0),
        "white": Image.new("RGB", (256, 256), (255, 255, 255)),
        "grey": Image.new("L", (256, 256), 128),
        "gradient": Image.fromarray(gradient),
        "text-page": _text_screenshot(rng),
        "doppler": _doppler_overlay(rng),
        "radiograph-like": _smooth_radiograph(rng, mammogram=False),
        "mammogram-like": _smooth_radiograph(rng, mammogram=True),
    }


def decompression_bomb_png(side: int = 30_000) -> bytes:
    """A valid black ``side`` x ``side`` one-bit PNG of about 100 KB (at 30,000: 900 megapixels):
    a decompression bomb, for tests and the API soak benchmark. Written row by row, so that its
    pixels never sit in memory at once."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    compressor, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)  # filter byte + pixels
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def ultrasound_dicom(
    frames: Sequence[np.ndarray],
    *,
    photometric: str = "MONOCHROME2",
    region: tuple[int, int, int, int] | None = None,
    spacing_cm: float = 0.01,
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    modality: str = "US",
    study: str | None = None,
):
    """A DICOM dataset (pydicom) of synthetic ultrasound ``frames``: 8-bit (rows, columns)
    greyscale arrays, or (rows, columns, 3) RGB arrays stored as ``photometric`` ``RGB`` or
    ``YBR_FULL``; with a ``region`` (left, top, right, bottom; inclusive) an Ultrasound Region
    Sequence item for the B-mode field, ``spacing_cm`` per pixel; compressed to
    ``transfer_syntax`` when it is not explicit VR little endian. One frame is an Ultrasound
    Image, several an Ultrasound Multi-frame Image; the patient, study and series are made up
    (``study``: the Study Instance UID to share with other files). Write it with
    ``dataset.save_as(path)``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import convert_color_space
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        UltrasoundImageStorage,
        UltrasoundMultiFrameImageStorage,
        generate_uid,
    )

    pixels = np.stack([np.asarray(frame, dtype=np.uint8) for frame in frames])
    colour = pixels.ndim == 4
    if photometric == "YBR_FULL":
        pixels = convert_color_space(pixels, "RGB", "YBR_FULL")
    meta = FileMetaDataset()
    multi_frame = len(pixels) > 1
    meta.MediaStorageSOPClassUID = (
        UltrasoundMultiFrameImageStorage if multi_frame else UltrasoundImageStorage
    )
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = modality
    _made_up_patient_and_study(dataset, study)
    dataset.Rows, dataset.Columns = pixels.shape[1:3]
    if multi_frame:
        dataset.NumberOfFrames = len(pixels)
    dataset.SamplesPerPixel = 3 if colour else 1
    dataset.PhotometricInterpretation = photometric
    if colour:
        dataset.PlanarConfiguration = 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.tobytes()
    if region is not None:
        dataset.SequenceOfUltrasoundRegions = [_bmode_region(region, spacing_cm)]
    if transfer_syntax != ExplicitVRLittleEndian:
        dataset.compress(transfer_syntax, pixels if len(pixels) > 1 else pixels[0])
    return dataset


def _made_up_patient_and_study(dataset, study: str | None) -> None:
    """The patient, study and series attributes a PACS and highdicom expect."""
    from pydicom.uid import generate_uid

    dataset.PatientName, dataset.PatientID = "Synthetic^Phantom", "SYNTHETIC-1"
    dataset.PatientBirthDate, dataset.PatientSex = "", "O"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study or generate_uid(), generate_uid()
    dataset.StudyDate, dataset.StudyTime, dataset.StudyID = "20260101", "120000", "1"
    dataset.AccessionNumber, dataset.ReferringPhysicianName = "", ""
    dataset.SeriesNumber, dataset.InstanceNumber, dataset.Manufacturer = 1, 1, "busdx synthetic"


def _bmode_region(region: tuple[int, int, int, int], spacing_cm: float):
    """An Ultrasound Region Sequence item: a 2D tissue region, ``spacing_cm`` per pixel."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = 1, 1, 0
    left, top, right, bottom = region
    item.RegionLocationMinX0, item.RegionLocationMinY0 = left, top
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = right, bottom
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3  # cm
    item.PhysicalDeltaX = item.PhysicalDeltaY = spacing_cm
    return item
