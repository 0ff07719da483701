"""Results as DICOM objects every viewer shows: a Structured Report and a Segmentation.

For each scored image or frame of a DICOM file, :func:`dicom_results` builds, with highdicom:

* a **Comprehensive SR** following TID 1500 (Measurement Report): the calibrated probability
  of malignancy, the likelihood category (computed from that probability, not a BI-RADS
  assessment), the decision at the model's threshold (or "not a scan"), the threshold and its
  policy, the model's name, version and sha256, the lesion's long and short axes (mm where the
  file gives its pixel spacing) and its orientation, shape, margin and posterior features, and
  a research-use statement; the lesion outline is a polyline on the source frame;
* where the model outlines, a binary **Segmentation** of the lesion.

Both belong to the source's patient and study, in new series, and reference the source
instance (and frame). Their UIDs are derived from the source's, the frame and the model's sha256
(:func:`result_uid`): the same frame scored by the same model gives the same objects, so storing
them again in a PACS replaces them instead of adding copies. The concepts DICOM has codes for
use them (SNOMED CT, DCM: the breast imaging lexicon's orientation, margin and posterior features);
busdx's own concepts use the private coding scheme ``99BUSDX``. highdicom 0.28 segments a
multi-frame image only when it has a frame of reference, which ultrasound cine loops lack: for those
the SR alone carries the outline (:attr:`DicomResults.skipped_segmentation` says why).
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.sr.codedict import codes

from busdx import __version__
from busdx.data.dicom import frame_origin, is_dicom_file
from busdx.fileio import atomic_path, sha256_file
from busdx.inference.predictor import Predictor
from busdx.lesion.descriptors import Lesion

__all__ = [
    "BUSDX_SCHEME",
    "DicomResults",
    "ModelIdentity",
    "ScoredFrame",
    "dicom_results",
    "model_identity",
    "result_uid",
    "write_dicom_results",
]

logger = logging.getLogger(__name__)
logging.getLogger("highdicom").setLevel(logging.WARNING)  # it narrates every module it copies

BUSDX_SCHEME = "99BUSDX"  # private coding scheme of busdx's own concepts
SR_SERIES_NUMBER, SEG_SERIES_NUMBER = 9701, 9702
RESEARCH_USE = "Research use only; not for clinical decisions"


def _busdx(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=BUSDX_SCHEME, meaning=meaning)


PROBABILITY = _busdx("P-MALIGNANT", "Calibrated probability of malignancy")
LIKELIHOOD = _busdx("LIKELIHOOD", "Likelihood category, computed (not BI-RADS)")
DECISION = _busdx("DECISION", "Model decision at its threshold")
POLICY = _busdx("THRESHOLD-POLICY", "Threshold policy")
INTENDED_USE = _busdx("INTENDED-USE", "Intended use")
NOT_A_SCAN = _busdx("NOT-A-SCAN", "Not a breast B-mode scan")
SHAPES = {"oval": codes.SCT.OvalShapedLesion, "round": codes.SCT.Round,
          "irregular": codes.SCT.Irregular}  # fmt: skip
MARGINS = {"circumscribed": codes.DCM.Circumscribed,
           "not circumscribed": _busdx("NOT-CIRCUMSCRIBED", "Not circumscribed")}  # fmt: skip
ORIENTATIONS = {"parallel": codes.DCM.Parallel, "not parallel": codes.DCM.NotParallel}
POSTERIOR = {"none": codes.DCM.NoPosteriorAcousticFeatures,
             "enhancement": codes.DCM.PosteriorEnhancement,
             "shadowing": codes.DCM.PosteriorShadowing}  # fmt: skip
LABELS = {"benign": codes.SCT.Benign, "malignant": codes.SCT.Malignant}


class ScoredFrame(Protocol):
    """What is reported of one frame (a :class:`busdx.inference.batch.Prediction` row)."""

    path: str
    frame: int | None
    probability: float | None
    label: str | None
    threshold: float
    likelihood_category: str | None
    out_of_scope: bool | None
    lesion: Lesion | None
    error: str | None


@dataclass(frozen=True)
class ModelIdentity:
    """What the SR and SEG say of the model that answered."""

    name: str  # the bundled model's or the run's name
    sha256: str  # of the model file
    threshold_policy: str  # target_sensitivity, youden or fixed


def model_identity(loaded: Predictor) -> ModelIdentity:
    """How the reports name a loaded model: its folder (the bundled model's or the run's
    name), the sha256 of the file that answers, its threshold policy. The file is hashed once
    while it is unchanged, not at every request or poll."""
    calibration = loaded.info.calibration
    stat = loaded.path.stat()
    return ModelIdentity(loaded.path.parent.name,
                         _sha256(loaded.path, stat.st_mtime_ns, stat.st_size),
                         calibration.threshold_policy if calibration else "fixed")  # fmt: skip


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


@dataclass(frozen=True)
class DicomResults:
    """The objects for one scored frame (``segmentation`` None: no outline, or see
    ``skipped_segmentation``); ``name``: ``<source SOP Instance UID>_f<frame>.dcm``."""

    report: pydicom.Dataset
    segmentation: pydicom.Dataset | None
    name: str
    skipped_segmentation: str | None = None

    def files(self) -> list[tuple[str, pydicom.Dataset]]:
        """Each object with its file name: ``SR_<name>``, then ``SEG_<name>`` if any."""
        named = [("SR", self.report), ("SEG", self.segmentation)]
        return [(f"{prefix}_{self.name}", dataset) for prefix, dataset in named if dataset]


def dicom_results(
    prediction: ScoredFrame, source: pydicom.Dataset, model: ModelIdentity
) -> DicomResults:
    """The SR (and, for an outlined lesion, the SEG) of ``prediction``, one scored frame of
    ``source`` (read with its pixels or without: only its header is used)."""
    frame = (prediction.frame or 0) + 1  # DICOM frame numbers start at 1
    name = f"{source.SOPInstanceUID}_f{frame}.dcm"
    outline = _full_frame_outline(prediction.lesion, source)
    report = _report(prediction, source, model, frame, outline)
    if outline is None:
        return DicomResults(report, None, name)
    frames = int(getattr(source, "NumberOfFrames", 1) or 1)
    if frames > 1 and "FrameOfReferenceUID" not in source:
        why = ("a multi-frame image without a frame of reference (highdicom segments one "
               "frame only there); the SR has the outline")  # fmt: skip
        return DicomResults(report, None, name, why)
    return DicomResults(report, _segmentation(source, model, frame, frames, outline), name)


def result_uid(*parts: object) -> str:
    """A UID determined by ``parts``: ``2.25.`` and a name-based UUID (PS3.5 B.2) of them, so
    the same parts give the same UID."""
    name = "\x1f".join(map(str, parts))
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _uids(source: pydicom.Dataset, model: ModelIdentity, frame: int, kind: str) -> dict:
    """The series (one per study, model and kind) and instance UIDs of a result."""
    return {
        "series_instance_uid": result_uid(source.StudyInstanceUID, model.sha256, kind),
        "sop_instance_uid": result_uid(source.SOPInstanceUID, frame, model.sha256, kind),
    }


def _full_frame_outline(lesion: Lesion | None, source: pydicom.Dataset) -> np.ndarray | None:
    """The lesion outline in the source frame's pixel coordinates (closed), or None."""
    if lesion is None or len(lesion.outline) < 3:
        return None
    left, top = frame_origin(source)
    points = np.asarray(lesion.outline, dtype=np.float32) + np.float32([left, top])
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=f"busdx {model.name}", version=__version__,
        parameters=[f"sha256={model.sha256}", f"threshold policy={model.threshold_policy}"],
    )  # fmt: skip


def _measurements(prediction: ScoredFrame) -> list[hd.sr.Measurement]:
    """The probability, the threshold and the lesion's axes (the group names the algorithm)."""
    unitless = codes.UCUM.NoUnits
    found = [
        hd.sr.Measurement(PROBABILITY, prediction.probability, unitless),
        hd.sr.Measurement(codes.DCM.ThresholdValue, prediction.threshold, unitless),
    ]
    lesion = prediction.lesion
    if lesion is not None:
        unit = codes.UCUM.Millimeter if lesion.unit == "mm" else hd.sr.CodedConcept(
            "{pixel}", "UCUM", "pixel")  # fmt: skip
        axes = ((codes.SCT.LongAxis, lesion.long_axis), (codes.SCT.ShortAxis, lesion.short_axis))
        found += [hd.sr.Measurement(name, value, unit) for name, value in axes]
    return found


def _evaluations(
    prediction: ScoredFrame, model: ModelIdentity
) -> list[hd.sr.QualitativeEvaluation]:
    decided = NOT_A_SCAN if prediction.out_of_scope else LABELS.get(prediction.label or "")
    pairs = [
        (DECISION, decided),
        (POLICY, _busdx(model.threshold_policy.upper(), model.threshold_policy)),
        (INTENDED_USE, _busdx("RESEARCH-ONLY", RESEARCH_USE)),
    ]
    if prediction.likelihood_category:
        category = prediction.likelihood_category
        pairs.append((LIKELIHOOD, _busdx(category, f"{category} range, computed (not BI-RADS)")))
    lesion = prediction.lesion
    if lesion is not None:
        pairs += [
            (codes.SCT.Shape, SHAPES[lesion.shape]),
            (codes.DCM.Margins, MARGINS[lesion.margin]),
            (codes.DCM.Orientation, ORIENTATIONS[lesion.orientation]),
        ]
        if lesion.posterior is not None:
            pairs.append((codes.DCM.PosteriorAcousticFeatures, POSTERIOR[lesion.posterior]))
    return [hd.sr.QualitativeEvaluation(name, value) for name, value in pairs if value]


def _report(
    prediction: ScoredFrame, source: pydicom.Dataset, model: ModelIdentity, frame: int,
    outline: np.ndarray | None,
) -> pydicom.Dataset:  # fmt: skip
    frames = [frame] if "NumberOfFrames" in source else None
    common = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=result_uid(source.SOPInstanceUID, frame, model.sha256, "finding"),
            identifier=f"busdx finding, frame {frame}"),
        "finding_type": codes.SCT.Lesion, "algorithm_id": _algorithm(model),
        "finding_sites": [hd.sr.FindingSite(codes.SCT.Breast)],
        "measurements": _measurements(prediction),
        "qualitative_evaluations": _evaluations(prediction, model),
    }  # fmt: skip
    if outline is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(**common, source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(source, frames)])  # fmt: skip
    else:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline,
            source_image=hd.sr.SourceImageForRegion.from_source_image(source, frames),
        )  # fmt: skip
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            **common, referenced_region=region)  # fmt: skip
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid(model.sha256, "device"), name="busdx", manufacturer_name="busdx",
            model_name=model.name,
            serial_number=model.sha256[:16]),
    )  # fmt: skip
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.UltrasonographyOfBreast, imaging_measurements=[group],
    )  # fmt: skip
    report = hd.sr.ComprehensiveSR(
        evidence=[source], content=content[0], **_uids(source, model, frame, "SR"),
        series_number=SR_SERIES_NUMBER, instance_number=frame,
        manufacturer="busdx", series_description=f"busdx {model.name} report (research use)"[:64],
    )  # fmt: skip
    report.CodingSchemeIdentificationSequence = [_busdx_scheme()]
    return report


def _busdx_scheme() -> pydicom.Dataset:
    """Declares the private coding scheme in the SR (PS3.3 C.12.1.1.3.1)."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = BUSDX_SCHEME
    item.CodingSchemeName = "busdx concepts"
    item.CodingSchemeResponsibleOrganization = "busdx maintainers"
    return item


def _segmentation(
    source: pydicom.Dataset, model: ModelIdentity, frame: int, frames: int, outline: np.ndarray
) -> pydicom.Dataset:
    canvas = Image.new("1", (int(source.Columns), int(source.Rows)))
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in outline.tolist()], fill=1, outline=1)
    mask = np.zeros((frames, int(source.Rows), int(source.Columns)), dtype=bool)
    mask[frame - 1] = np.asarray(canvas, dtype=bool)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"busdx {model.name}", version=__version__,
        family=codes.cid7162.ArtificialIntelligence,
    )  # fmt: skip
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion (busdx)",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )  # fmt: skip
    segmentation = hd.seg.Segmentation(
        source_images=[source], pixel_array=mask if frames > 1 else mask[0],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        **_uids(source, model, frame, "SEG"), series_number=SEG_SERIES_NUMBER,
        instance_number=frame, manufacturer="busdx", manufacturer_model_name=model.name,
        software_versions=__version__, device_serial_number=model.sha256[:16],
        series_description=f"busdx {model.name} lesion (research use)"[:64],
    )  # fmt: skip
    # General Image, type 2C where the source has no patient orientation vectors: the source's
    # own value, else empty (highdicom 0.28 leaves it out for images without a frame of reference)
    segmentation.PatientOrientation = source.get("PatientOrientation", "")
    return segmentation


def write_dicom_results(
    rows: Iterable[ScoredFrame], out: Path, model: ModelIdentity
) -> Iterator[ScoredFrame]:
    """Pass ``rows`` through, writing into ``out`` the SR (``SR_<source SOP instance
    UID>_f<frame>.dcm``) and SEG (``SEG_...``) of each scored frame of a DICOM file. A source
    that cannot be reported on is logged and skipped; the rows are never changed."""
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.error is None and row.frame is not None and is_dicom_file(Path(row.path)):
            try:
                _write(row, out, model)
            except (ValueError, TypeError, AttributeError, OSError) as exc:
                logger.warning("%s: no DICOM results (%s: %s)", row.path, type(exc).__name__, exc)
        elif row.error is None:
            logger.warning("%s: not a DICOM file, so no DICOM results", row.path)
        yield row


def _write(row: ScoredFrame, out: Path, model: ModelIdentity) -> None:
    source = pydicom.dcmread(row.path, stop_before_pixels=True)
    results = dicom_results(row, source, model)
    if results.skipped_segmentation:
        logger.info("%s frame %d: no SEG: %s", row.path, row.frame + 1,
                    results.skipped_segmentation)  # fmt: skip
    for name, dataset in results.files():
        with atomic_path(out / name) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
