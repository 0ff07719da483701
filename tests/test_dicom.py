"""DICOM input: pydicom's own test files, ultrasound DICOMs written here, and the bad ones.

pydicom's wheel ships test files of many transfer syntaxes and photometric interpretations
(none of them ultrasound, so they are read with BUSDX_ANY_MODALITY=1); the ultrasound files
(modality US, multi-frame, RGB / YBR, compressed, with and without a region sequence) are
written by :func:`busdx.data.synthetic.ultrasound_dicom`.
"""

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from busdx.cli import main
from busdx.data.dicom import ANY_MODALITY_ENV, count_frames
from busdx.data.imaging import ORIGIN_KEY, SPACING_KEY, ImageInput, load_image
from busdx.data.synthetic import make_lesion_image, ultrasound_dicom, write_synthetic_dataset
from busdx.errors import ImageDecodeError
from busdx.inference.batch import predict_files
from busdx.inference.predictor import load_model
from busdx.serving import create_app

from conftest import FAST, train_run

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REGION = (40, 10, 135, 105)  # left, top, right, bottom (inclusive): a 96 x 96 B-mode field


def _grey(x: Path | str, frame: int = 0) -> np.ndarray:
    return np.asarray(load_image(x, frame=frame), dtype=int)


@pytest.fixture
def any_modality(monkeypatch):
    monkeypatch.setenv(ANY_MODALITY_ENV, "1")


@pytest.fixture(scope="module")
def scan() -> tuple[np.ndarray, np.ndarray]:
    """A 120 x 160 frame with a 96 x 96 B-mode field at REGION, and that field."""
    field = np.asarray(make_lesion_image(True, size=96, seed=1)[0])
    frame = np.zeros((120, 160), np.uint8)
    frame[10:106, 40:136] = field
    return frame, field


def _write(path: Path, frames, **options) -> Path:
    ultrasound_dicom(frames, **options).save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    "compressed", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_lossless_transfer_syntaxes_give_the_uncompressed_image(any_modality, compressed):
    reference = _grey(PYDICOM_FILES / "MR_small.dcm")  # 16-bit MONOCHROME2, windowed to 8 bits
    assert reference.shape == (64, 64, 3) and reference.std() > 10
    np.testing.assert_array_equal(_grey(PYDICOM_FILES / compressed), reference)


def test_jpeg_baseline_and_ybr_colour_files(any_modality):
    lossless = _grey(PYDICOM_FILES / "SC_rgb_rle.dcm")  # RGB, RLE
    assert lossless.shape == (100, 100, 3) and (lossless[..., 0] != lossless[..., 2]).any()
    for lossy in ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_dcmtk_+eb+cy+n2.dcm"):  # baseline RGB / YBR
        assert np.abs(_grey(PYDICOM_FILES / lossy) - lossless).mean() < 3
    ybr_422 = _grey(PYDICOM_FILES / "SC_ybr_full_422_uncompressed.dcm")
    assert np.abs(ybr_422 - lossless).mean() < 3  # YBR_FULL_422 -> the same RGB picture


def test_multi_frame_and_frame_choice(any_modality):
    path = PYDICOM_FILES / "SC_rgb_rle_2frame.dcm"
    assert count_frames(path) == 2
    first, second = _grey(path, 0), _grey(path, 1)
    assert first.shape == second.shape == (100, 100, 3) and (first != second).any()
    with pytest.raises(ImageDecodeError, match="has 2 frame"):
        load_image(path, frame=2)


def test_other_modalities_need_the_override(monkeypatch):
    monkeypatch.delenv(ANY_MODALITY_ENV, raising=False)
    with pytest.raises(ImageDecodeError, match="modality CT is not ultrasound"):
        load_image(PYDICOM_FILES / "CT_small.dcm")
    monkeypatch.setenv(ANY_MODALITY_ENV, "1")
    assert load_image(PYDICOM_FILES / "CT_small.dcm").size == (128, 128)


@pytest.mark.parametrize(
    ("syntax", "photometric"),
    [(syntax, photometric) for syntax in (None, RLELossless, JPEG2000Lossless)
     for photometric in ("MONOCHROME2", "RGB", "YBR_FULL")]
    + [(JPEGLSLossless, "MONOCHROME2")],  # JPEG-LS: greyscale files only
)  # fmt: skip
def test_written_ultrasound_files_crop_to_the_bmode_region(tmp_path, scan, syntax, photometric):
    frame, field = scan
    frames = [frame, frame[::-1].copy()]
    if photometric != "MONOCHROME2":
        frames = [np.repeat(f[:, :, None], 3, axis=2) for f in frames]
    options = {"transfer_syntax": syntax} if syntax else {}
    path = _write(tmp_path / "scan.dcm", frames, photometric=photometric, region=REGION, **options)
    image = load_image(path)
    assert image.size == (96, 96) and image.info[ORIGIN_KEY] == (40, 10)
    assert image.info[SPACING_KEY] == pytest.approx((0.1, 0.1))  # 0.01 cm per pixel
    tolerance = 1 if photometric == "YBR_FULL" else 0  # YBR <-> RGB rounding
    assert np.abs(np.asarray(image)[..., 0].astype(int) - field).max() <= tolerance
    flipped = np.asarray(load_image(path, frame=1))[..., 0].astype(int)
    assert np.abs(flipped - frame[::-1][10:106, 40:136]).max() <= tolerance


def test_without_a_region_sequence_the_whole_frame_is_read(tmp_path, scan):
    frame, _ = scan
    image = load_image(_write(tmp_path / "plain.dcm", [frame]))
    assert image.size == (160, 120) and image.info[ORIGIN_KEY] == (0, 0)
    assert image.info[SPACING_KEY] is None


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bad_files(folder: Path, frame: np.ndarray) -> dict[str, tuple[Path, str]]:
    good = _write(folder / "good.dcm", [frame])
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 500])
    headless = folder / "header-only.dcm"
    headless.write_bytes(good.read_bytes()[:200])
    no_pixels = ultrasound_dicom([frame])
    del no_pixels.PixelData
    no_pixels.save_as(folder / "no-pixels.dcm", enforce_file_format=True)
    (folder / "not-dicom.dcm").write_bytes(b"this is a text file, not DICOM " * 20)
    return {
        "truncated": (truncated, "damaged DICOM pixel data"),
        "header only": (headless, "no pixel data"),
        "no pixel data": (folder / "no-pixels.dcm", "no pixel data"),
        "not DICOM": (folder / "not-dicom.dcm", "not a DICOM file|no pixel data"),
        "12-bit JPEG": (PYDICOM_FILES / "JPGExtended.dcm", "modality|cannot decode"),
        "frame out of range": (good, "there is no frame 3"),
    }


def test_bad_dicom_files_get_a_clear_error_and_are_never_modified(tmp_path, scan):
    for name, (path, message) in _bad_files(tmp_path, scan[0]).items():
        before = _sha(path)
        with pytest.raises(ImageDecodeError, match=message):
            load_image(path, frame=3 if name == "frame out of range" else 0)
        assert _sha(path) == before, name


def test_12bit_jpeg_names_what_would_decode_it(any_modality):
    with pytest.raises(ImageDecodeError, match=r"JPEG Extended.*12-bit"):
        load_image(PYDICOM_FILES / "JPGExtended.dcm")


@pytest.fixture(scope="module")
def dicom_data(tmp_path_factory) -> Path:
    """The synthetic dataset with every image stored as a multi-frame ultrasound DICOM."""
    pngs = write_synthetic_dataset(tmp_path_factory.mktemp("png"), n_per_class=8, seed=4)
    root = tmp_path_factory.mktemp("dicom-data")
    for png in sorted(pngs.rglob("*.png")):
        pixels = np.asarray(Image.open(png))
        target = root / png.parent.name / f"{png.stem}.dcm"
        target.parent.mkdir(exist_ok=True)
        _write(target, [pixels, pixels[::-1].copy()], transfer_syntax=RLELossless)
    return root


@pytest.fixture(scope="module")
def dicom_run(dicom_data, tmp_path_factory) -> Path:
    return train_run(dicom_data, tmp_path_factory.mktemp("dicom-run") / "run", *FAST, epochs=1)


def test_audit_and_train_read_a_dicom_dataset(dicom_data, dicom_run, tmp_path):
    assert main(["audit", "--data", str(dicom_data), "--out", str(tmp_path / "audit"),
                 "--no-progress"]) == 0  # fmt: skip
    split = list(csv.DictReader((dicom_run / "split.csv").open()))
    assert len(split) == 16 and all(row["path"].endswith(".dcm") for row in split)
    assert (dicom_run / "metrics.json").is_file()


def test_predict_a_dicom_and_every_frame_of_one(dicom_run, dicom_data, tmp_path, monkeypatch):
    monkeypatch.setenv(ANY_MODALITY_ENV, "0")  # restored after --any-modality sets it
    scan_file = next((dicom_data / "malignant").glob("*.dcm"))
    ct = tmp_path / "ct.dcm"
    ct.write_bytes((PYDICOM_FILES / "CT_small.dcm").read_bytes())
    one, every = tmp_path / "one.csv", tmp_path / "every.csv"
    args = ["predict", "--run", str(dicom_run), "--no-progress", "--backend", "torch"]
    assert main([*args, str(scan_file), "--out", str(one)]) == 0
    assert main([*args, str(scan_file), str(ct), "--frame", "all", "--out", str(every)]) == 0
    (single,) = csv.DictReader(one.open())
    rows = list(csv.DictReader(every.open()))
    (direct,) = predict_files(load_model(dicom_run, backend="torch"), [scan_file], progress=False)
    assert single["frame"] == "0"
    assert float(single["probability_malignant"]) == pytest.approx(direct.probability, abs=1e-5)
    assert [row["frame"] for row in rows[:2]] == ["0", "1"]
    # one image alone and in a batch of three: equal up to float noise (kernels differ by CPU)
    first, alone = float(rows[0]["probability_malignant"]), float(single["probability_malignant"])
    assert abs(first - alone) <= 1e-5
    assert abs(first - float(rows[1]["probability_malignant"])) > 1e-5  # the flipped frame
    assert "not ultrasound" in rows[2]["error"] and not rows[2]["probability_malignant"]
    assert main([*args, str(ct), "--any-modality", "--out", str(tmp_path / "ct.csv")]) == 0
    (ct_row,) = csv.DictReader((tmp_path / "ct.csv").open())
    assert not ct_row["error"] and ct_row["probability_malignant"]


def test_serve_reads_dicom_uploads(dicom_run, dicom_data):
    scan_file = next((dicom_data / "benign").glob("*.dcm"))
    with TestClient(create_app(dicom_run), raise_server_exceptions=False) as client:
        answer = client.post("/predict", files=[("files", ("scan.dcm", scan_file.read_bytes()))],
                             data={"frame": "1"})  # fmt: skip
        assert answer.status_code == 200, answer.text
        (frame_1,) = predict_files(load_model(dicom_run), [ImageInput(scan_file, 1, None)],
                                   progress=False)  # fmt: skip
        served = answer.json()["predictions"][0]["probability_malignant"]
        assert served == pytest.approx(frame_1.probability, abs=1e-5)  # the frame asked for
        ct = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
        refused = client.post("/predict", files=[("files", ("ct.dcm", ct))])
        assert refused.status_code == 400 and "not ultrasound" in refused.json()["detail"]
        truncated = client.post(
            "/predict", files=[("files", ("cut.dcm", scan_file.read_bytes()[:-300]))]
        )
        assert truncated.status_code == 400 and "DICOM" in truncated.json()["detail"]
        no_frame = client.post("/predict", files=[("files", ("scan.dcm", scan_file.read_bytes()))],
                               data={"frame": "7"})  # fmt: skip
        assert no_frame.status_code == 400 and "no frame 7" in no_frame.json()["detail"]
