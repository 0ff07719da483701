"""DICOM results (issue 30): busdx predict --dicom-out writes, for each scored frame, a TID 1500
Structured Report and, where the model outlines, a Segmentation; checked by reading them back
(highdicom, pydicom) and, where Debian's dicom3tools is installed, with its validator."""

import csv
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from busdx.cli import main
from busdx.data.synthetic import make_lesion_image, ultrasound_dicom
from busdx.pacs.dicom_out import BUSDX_SCHEME, DECISION, LIKELIHOOD, PROBABILITY, RESEARCH_USE

REGION = (8, 8, 247, 247)  # the B-mode field, 0.1 mm per pixel


def _scan(seed: int) -> np.ndarray:
    return np.asarray(make_lesion_image(seed % 2 == 1, size=256, seed=seed)[0].convert("L"))


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """Four cases through the bundled model: one frame with the region's spacing, two frames,
    RGB, and one frame without any spacing."""
    folder = tmp_path_factory.mktemp("dicom-out")
    study = pydicom.uid.generate_uid()
    cases = {
        "single": ultrasound_dicom([_scan(1)], region=REGION, study=study),
        "multi": ultrasound_dicom([_scan(2), _scan(3)], region=REGION, study=study),
        "rgb": ultrasound_dicom(
            [np.stack([_scan(5)] * 3, axis=-1)], photometric="RGB", region=REGION, study=study
        ),
        "nospacing": ultrasound_dicom([_scan(7)], study=study),
    }
    for name, dataset in cases.items():
        dataset.save_as(folder / f"{name}.dcm", enforce_file_format=True)
    out, table = folder / "results", folder / "predictions.csv"
    assert main(["predict", str(folder), "--frame", "all", "--dicom-out", str(out),
                 "--out", str(table), "--no-progress"]) == 0  # fmt: skip
    rows = {(r["path"].rsplit("/", 1)[-1].removesuffix(".dcm"), int(r["frame"])): r
            for r in csv.DictReader(table.open())}  # fmt: skip
    sources = {name: pydicom.dcmread(folder / f"{name}.dcm") for name in cases}
    return out, rows, sources


def _items(dataset) -> list:
    """Every content item of an SR, depth first."""
    found = []
    for item in dataset.get("ContentSequence", []):
        found.append(item)
        found += _items(item)
    return found


def _value(items: list, concept):
    for item in items:
        name = item.ConceptNameCodeSequence[0]
        if (name.CodeValue, name.CodingSchemeDesignator) == (concept.value,
                                                           concept.scheme_designator):  # fmt: skip
            if item.ValueType == "NUM":
                measured = item.MeasuredValueSequence[0]
                return float(measured.NumericValue), measured.MeasurementUnitsCodeSequence[0]
            return item.ConceptCodeSequence[0]
    return None


def _files(out, name, sources):
    uid = sources[name].SOPInstanceUID
    return sorted(out.glob(f"SR_{uid}_f*.dcm")), sorted(out.glob(f"SEG_{uid}_f*.dcm"))


def test_every_scored_frame_gets_a_report_that_says_what_the_csv_says(predicted):
    out, rows, sources = predicted
    for (name, frame), row in rows.items():
        report = hd.sr.srread(out / f"SR_{sources[name].SOPInstanceUID}_f{frame + 1}.dcm")
        items = _items(report)
        probability, unit = _value(items, PROBABILITY)
        assert probability == pytest.approx(float(row["probability_malignant"]), abs=1e-6)
        assert unit.CodeValue == "1"
        assert _value(items, codes.DCM.ThresholdValue)[0] == pytest.approx(float(row["threshold"]))
        assert _value(items, DECISION).CodeMeaning.lower() == row["label"]
        category = _value(items, LIKELIHOOD)
        assert (
            category.CodeValue == row["likelihood_category"]
            and "not BI-RADS" in category.CodeMeaning
        )
        intended = next(i for i in items if i.get("ConceptCodeSequence")
                        and i.ConceptCodeSequence[0].CodeMeaning == RESEARCH_USE)  # fmt: skip
        assert intended.ConceptCodeSequence[0].CodingSchemeDesignator == BUSDX_SCHEME
        long_axis, unit = _value(items, codes.SCT.LongAxis)
        assert long_axis == pytest.approx(float(row["lesion_long_axis"]), abs=0.006)  # CSV: 2 dp
        assert unit.CodeValue == ("{pixel}" if name == "nospacing" else "mm")
        shape = _value(items, codes.SCT.Shape).CodeMeaning.lower()
        assert row["lesion_shape"] in shape
        # the source's patient and study, a new series, the source instance as evidence
        source = sources[name]
        assert (report.PatientID, report.StudyInstanceUID) == (source.PatientID,
                                                               source.StudyInstanceUID)  # fmt: skip
        assert report.SeriesInstanceUID != source.SeriesInstanceUID
        evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
        referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_the_outline_is_a_polyline_on_the_source_frame_and_a_segmentation(predicted):
    out, _, sources = predicted
    for name in ("single", "rgb", "nospacing"):
        (sr,), (seg_file,) = _files(out, name, sources)
        region = next(i for i in _items(pydicom.dcmread(sr)) if i.ValueType == "SCOORD")
        points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1]) and len(points) > 4  # closed
        segmentation = hd.seg.segread(seg_file)
        mask = segmentation.get_pixels_by_source_instance(
            [sources[name].SOPInstanceUID], segment_numbers=[1]
        )[0, ..., 0].astype(bool)  # fmt: skip
        assert mask.shape == (sources[name].Rows, sources[name].Columns)
        # the mask fills the polyline: its pixels' extent is the outline's
        ys, xs = np.nonzero(mask)
        assert (
            abs(xs.min() - points[:, 0].min()) <= 1.5 and abs(ys.max() - points[:, 1].max()) <= 1.5
        )
        if name != "nospacing":  # drawn in the full frame: the B-mode field's corner is added
            assert points[:, 0].min() >= REGION[0] and points[:, 1].min() >= REGION[1]
        assert segmentation.StudyInstanceUID == sources[name].StudyInstanceUID


def test_a_cine_loop_gets_a_report_per_frame_with_its_frame_number_and_no_segmentation(predicted):
    out, _, sources = predicted
    reports, segmentations = _files(out, "multi", sources)
    assert len(reports) == 2 and not segmentations
    for frame, report in enumerate(reports, start=1):
        region = next(i for i in _items(pydicom.dcmread(report)) if i.ValueType == "SCOORD")
        referenced = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == sources["multi"].SOPInstanceUID
        assert np.atleast_1d(referenced.ReferencedFrameNumber).tolist() == [frame]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools is not installed")
def test_every_object_passes_the_dicom_validator(predicted):
    out, _, _ = predicted
    written = sorted(out.glob("*.dcm"))
    assert len(written) == 5 + 3  # a report per frame, a segmentation per single-frame image
    for path in written:
        checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in checked.stderr.splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)


def test_a_png_gets_predicted_and_a_warning_but_no_dicom(tmp_path, caplog):
    from PIL import Image

    Image.fromarray(_scan(9)).save(tmp_path / "scan.png")
    assert main(["predict", str(tmp_path / "scan.png"), "--dicom-out", str(tmp_path / "out"),
                 "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0  # fmt: skip
    assert "not a DICOM file, so no DICOM results" in caplog.text
    assert not list((tmp_path / "out").iterdir())


def test_the_api_answers_a_dicom_upload_with_its_results_as_a_zip(tmp_path):
    import io
    import zipfile

    from fastapi.testclient import TestClient

    from busdx.bundled import resolve_run
    from busdx.serving import ServeSettings, create_app

    ultrasound_dicom([_scan(1)], region=REGION).save_as(tmp_path / "scan.dcm",
                                                        enforce_file_format=True)  # fmt: skip
    with TestClient(create_app(resolve_run(None), ServeSettings())) as client:
        files = {"file": ("scan.dcm", (tmp_path / "scan.dcm").read_bytes())}
        answer = client.post("/predict/dicom", files=files)
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
        names = sorted(zipfile.ZipFile(io.BytesIO(answer.content)).namelist())
        assert [n.split("_")[0] for n in names] == ["SEG", "SR"]
        report = pydicom.dcmread(io.BytesIO(zipfile.ZipFile(io.BytesIO(answer.content)).read(
            names[1])))  # fmt: skip
        predicted = client.post("/predict", files={"files": files["file"]}).json()
        probability = _value(_items(report), PROBABILITY)[0]
        assert probability == pytest.approx(
            predicted["predictions"][0]["probability_malignant"], abs=1e-5)  # fmt: skip
        png = client.post("/predict/dicom", files={"file": ("a.png", b"\x89PNG" + bytes(200))})
        assert png.status_code == 400 and png.json()["error"] == "not_dicom"
