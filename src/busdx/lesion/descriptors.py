"""A lesion described from its mask, as a reader reports it: size, orientation, shape, margin,
posterior features, and the outline to draw.

Every descriptor is a rule on the mask's geometry (and, for posterior features, on the image
below it), written out here with its threshold, so that a reader can check it against what they
see. The BI-RADS ultrasound lexicon (ACR BI-RADS Atlas, 5th edition) defines the categories:

* **size**: the longest diameter and the longest diameter across it (perpendicular), in mm
  when the pixel spacing is known, in pixels otherwise;
* **orientation**: ``parallel`` (wider than tall, the long axis along the skin) or
  ``not parallel`` ("taller than wide": the vertical extent exceeds the horizontal one);
* **shape**: ``oval``, ``round`` or ``irregular``. Irregular when the mask departs from the
  ellipse of the same second moments (their intersection over union below
  :data:`ELLIPSE_IOU_REGULAR`) or from its own convex hull (solidity below
  :data:`SOLIDITY_REGULAR`); otherwise round when the ellipse's minor/major axis ratio reaches
  :data:`ROUND_RATIO`, else oval;
* **margin**: ``circumscribed`` or ``not circumscribed``, from the outline's irregularity: the
  standard deviation of the outline's radial distance from the fitted ellipse, relative to the
  ellipse's radius, above :data:`MARGIN_IRREGULARITY` is not circumscribed (spiculated,
  angular, microlobulated and indistinct margins all roughen the outline);
* **posterior features**: ``enhancement``, ``shadowing`` or ``none``, from the mean brightness
  of the band below the lesion (half its height deep) against the bands beside it at the same
  depth (each half the lesion's width; ratio above
  :data:`ENHANCEMENT_RATIO` or below :data:`SHADOWING_RATIO`); None when the image leaves no
  room to measure.

The thresholds were set from these definitions before any comparison with readers; the docs
report how well each descriptor agrees with the BrEaST radiologists, good or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import contourpy
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

__all__ = [
    "ELLIPSE_IOU_REGULAR",
    "ENHANCEMENT_RATIO",
    "LESION_FIELDS",
    "MARGIN_IRREGULARITY",
    "ROUND_RATIO",
    "SHADOWING_RATIO",
    "SOLIDITY_REGULAR",
    "Lesion",
    "describe_lesion",
    "largest_region",
    "lesion_fields",
]

ELLIPSE_IOU_REGULAR = 0.85
SOLIDITY_REGULAR = 0.92
ROUND_RATIO = 0.85
MARGIN_IRREGULARITY = 0.08
ENHANCEMENT_RATIO = 1.15
SHADOWING_RATIO = 0.85


@dataclass(frozen=True)
class Lesion:
    """What :func:`describe_lesion` reads from a mask (lengths in ``unit``)."""

    unit: str  # "mm" when the pixel spacing is known, else "px"
    long_axis: float  # longest diameter
    short_axis: float  # longest diameter perpendicular to it
    width: float  # horizontal extent
    height: float  # vertical extent (depth)
    area: float  # in unit squared
    orientation: str  # "parallel" or "not parallel"
    shape: str  # "oval", "round" or "irregular"
    margin: str  # "circumscribed" or "not circumscribed"
    posterior: str | None  # "enhancement", "shadowing", "none"; None: not measurable
    ellipse_iou: float
    solidity: float
    axis_ratio: float  # fitted ellipse's minor / major axis
    margin_irregularity: float
    posterior_ratio: float | None
    outline: list[tuple[float, float]]  # (x, y) pixel coordinates of the image, closed

    def summary(self) -> str:
        """One line for a terminal or a table cell."""
        size = f"{self.long_axis:.1f} x {self.short_axis:.1f} {self.unit}"
        posterior = (
            "posterior not measurable"
            if self.posterior is None
            else (f"posterior {self.posterior}")
        )
        return f"{size}, {self.shape}, {self.orientation}, {self.margin}, {posterior}"


LESION_FIELDS = (
    "lesion_long_axis", "lesion_short_axis", "lesion_unit", "lesion_shape",
    "lesion_orientation", "lesion_margin", "lesion_posterior",
)  # fmt: skip


def lesion_fields(lesion: Lesion | None) -> dict[str, float | str | None]:
    """A lesion as the flat columns of a prediction row (all None without one)."""
    if lesion is None:
        return dict.fromkeys(LESION_FIELDS)
    return {
        "lesion_long_axis": round(lesion.long_axis, 2),
        "lesion_short_axis": round(lesion.short_axis, 2),
        "lesion_unit": lesion.unit,
        "lesion_shape": lesion.shape,
        "lesion_orientation": lesion.orientation,
        "lesion_margin": lesion.margin,
        "lesion_posterior": lesion.posterior,
    }


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest connected region of a binary mask, its holes filled (empty stays empty)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = ndimage.sum_labels(np.ones(mask.shape), labels, index=np.arange(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def _points(region: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    ys, xs = np.nonzero(region)
    return np.column_stack([(xs + 0.5) * spacing[0], (ys + 0.5) * spacing[1]])


def _corners(points: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """The four corners of each pixel (pixel centres ``points``)."""
    half = np.array(spacing) / 2
    return np.concatenate([points + half * [sx, sy] for sx in (-1, 1) for sy in (-1, 1)])


def _hull(corners: np.ndarray) -> tuple[np.ndarray, float]:
    """The convex hull's vertices and area."""
    try:
        hull = ConvexHull(corners)
    except QhullError:  # degenerate: a line of pixels
        return corners, 0.0
    return corners[hull.vertices], float(hull.volume)


def _diameters(hull: np.ndarray) -> tuple[float, float]:
    """Longest diameter (maximum Feret) and the extent across it."""
    gaps = hull[:, None, :] - hull[None, :, :]
    lengths = np.hypot(gaps[..., 0], gaps[..., 1])
    i, j = np.unravel_index(int(np.argmax(lengths)), lengths.shape)
    direction = gaps[i, j] / max(lengths[i, j], 1e-12)
    across = hull @ np.array([-direction[1], direction[0]])
    return float(lengths[i, j]), float(across.max() - across.min())


def _ellipse(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, semi-axes (major, minor) and axis directions of the ellipse with the points'
    second moments (a uniform ellipse of semi-axes a, b has variances a^2/4, b^2/4)."""
    centre = points.mean(axis=0)
    variances, axes = np.linalg.eigh(np.cov((points - centre).T))
    semi = 2 * np.sqrt(np.maximum(variances[::-1], 1e-12))
    return centre, semi, axes[:, ::-1]


def _ellipse_iou(region: np.ndarray, spacing, centre, semi, axes) -> float:
    """Intersection over union of the region and the fitted ellipse, on a pixel grid spanning
    both (the ellipse may reach past the region's bounding box)."""
    half = np.sqrt((semi[0] * axes[:, 0]) ** 2 + (semi[1] * axes[:, 1]) ** 2)  # x and y extents
    low = np.floor((centre - half) / spacing).astype(int) - 1
    high = np.ceil((centre + half) / spacing).astype(int) + 1
    x0, y0 = min(low[0], 0), min(low[1], 0)
    x1, y1 = max(high[0], region.shape[1]), max(high[1], region.shape[0])
    grid = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    grid[-y0 : -y0 + region.shape[0], -x0 : -x0 + region.shape[1]] = region
    x = (np.arange(x0, x1) + 0.5) * spacing[0] - centre[0]
    y = (np.arange(y0, y1) + 0.5) * spacing[1] - centre[1]
    along = x[None, :] * axes[0, 0] + y[:, None] * axes[1, 0]
    across = x[None, :] * axes[0, 1] + y[:, None] * axes[1, 1]
    ellipse = (along / semi[0]) ** 2 + (across / semi[1]) ** 2 <= 1
    return float((ellipse & grid).sum() / max((ellipse | grid).sum(), 1))


def _outline(region: np.ndarray) -> np.ndarray:
    """The region's boundary as a closed polygon of (x, y) image coordinates (pixel i spans
    i to i + 1), half-way between the region's pixels and their neighbours."""
    padded = np.pad(region.astype(float), 1)
    lines = contourpy.contour_generator(z=padded).lines(0.5)
    return max(lines, key=len) - 0.5  # undo the padding, to pixel-edge coordinates


def _irregularity(outline: np.ndarray, spacing, centre, semi, axes) -> float:
    """Standard deviation of the outline's radial distance from the fitted ellipse, relative
    to the ellipse's radius in the same direction."""
    local = (outline * spacing - centre) @ axes
    angle = np.arctan2(local[:, 1], local[:, 0])
    radius = np.hypot(local[:, 0], local[:, 1])
    ellipse = semi[0] * semi[1] / np.hypot(semi[1] * np.cos(angle), semi[0] * np.sin(angle))
    return float(np.std(radius / ellipse - 1))


def _posterior(image: np.ndarray, region: np.ndarray, top: int, left: int) -> float | None:
    """Mean brightness of the band below the lesion (as wide as the lesion, half as deep)
    over that of the bands beside it at the same depth, each half the lesion's width (None when
    the image has no room for them). ``region`` is the lesion's box, at ``top``, ``left``."""
    rows, cols = np.nonzero(region)
    bottom, left, right = top + rows.max() + 1, left + cols.min(), left + cols.max() + 1
    depth, side = max(2, (rows.max() + 1 - rows.min()) // 2), max(1, (right - left) // 2)
    if bottom + depth > image.shape[0] or left - side < 0 or right + side > image.shape[1]:
        return None
    band = image[bottom : bottom + depth]
    beside = np.concatenate([band[:, left - side : left], band[:, right : right + side]], axis=1)
    return float(band[:, left:right].mean() / beside.mean()) if beside.mean() > 0 else None


def describe_lesion(
    mask: np.ndarray, image: np.ndarray | None = None, spacing: tuple[float, float] | None = None,
    origin: tuple[float, float] = (0, 0),
) -> Lesion | None:  # fmt: skip
    """Describe the largest region of ``mask`` (2-D, True or > 0.5: lesion); None when empty.

    ``image``: the grey scan of the same size, for posterior features; ``spacing``: the
    pixel size (x, y) in mm, when known; ``origin``: where the mask's corner lies in the
    image whose coordinates the outline should have.
    """
    binary = np.asarray(mask) > 0.5
    rows, cols = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
    if not len(rows):
        return None
    top, left = int(rows[0]), int(cols[0])  # work inside the lesion's bounding box
    region = largest_region(binary[top : rows[-1] + 1, left : cols[-1] + 1])
    if region.sum() < 3:
        return None
    unit, step = ("mm", tuple(map(float, spacing))) if spacing else ("px", (1.0, 1.0))
    points = _points(region, step)
    boundary = region & ~ndimage.binary_erosion(region)  # the hull needs the border alone
    hull, hull_area = _hull(_corners(_points(boundary, step), step))
    long_axis, short_axis = _diameters(hull)
    centre, semi, axes = _ellipse(points)
    width = (np.ptp(np.flatnonzero(region.any(axis=0))) + 1) * step[0]
    height = (np.ptp(np.flatnonzero(region.any(axis=1))) + 1) * step[1]
    area = float(region.sum() * step[0] * step[1])
    solidity = area / hull_area if hull_area else 1.0
    iou = _ellipse_iou(region, np.array(step), centre, semi, axes)
    ratio = float(semi[1] / semi[0])
    outline = _outline(region)
    irregularity = _irregularity(outline, step, centre, semi, axes)
    outline += [left + origin[0], top + origin[1]]
    regular = iou >= ELLIPSE_IOU_REGULAR and solidity >= SOLIDITY_REGULAR
    posterior_ratio = None
    if image is not None:
        posterior_ratio = _posterior(np.asarray(image, float), region, top, left)
    return Lesion(
        unit=unit, long_axis=long_axis, short_axis=short_axis, width=width, height=height,
        area=area,
        orientation="not parallel" if height > width else "parallel",
        shape=("round" if ratio >= ROUND_RATIO else "oval") if regular else "irregular",
        margin="not circumscribed" if irregularity > MARGIN_IRREGULARITY else "circumscribed",
        posterior=_posterior_label(posterior_ratio), ellipse_iou=iou, solidity=solidity,
        axis_ratio=ratio, margin_irregularity=irregularity, posterior_ratio=posterior_ratio,
        outline=list(map(tuple, np.round(outline, 1).tolist())),
    )  # fmt: skip


def _posterior_label(ratio: float | None) -> str | None:
    if ratio is None or math.isnan(ratio):
        return None
    if ratio > ENHANCEMENT_RATIO:
        return "enhancement"
    return "shadowing" if ratio < SHADOWING_RATIO else "none"
