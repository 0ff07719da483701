"""Lesion boxes and ROI mode: boxes from masks and CSVs, the crop, training, predict and API."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from busdx.cli import main
from busdx.data.boxes import (
    box_to_text,
    check_box,
    crop_rectangle,
    crop_to_box,
    find_masks,
    mask_box,
    parse_box,
    read_boxes_csv,
    read_mask,
)
from busdx.data.datasets import attach_boxes, scan_dataset
from busdx.data.imaging import ORIGIN_KEY, ImageInput
from busdx.data.preprocess import Preprocessing, load_region
from busdx.errors import BoxError, DataError
from busdx.inference.batch import predict_files
from busdx.inference.model_file import read_model_file
from busdx.inference.predictor import load_model
from busdx.serving import create_app
from busdx.training.loading import ImageDataset
from busdx.training.transforms import build_decode_transform

from conftest import FAST, assert_same_rows, train_run


@pytest.mark.parametrize(
    ("text", "message"),
    [("1,2,0,5", "zero area"), ("1,2,5", "four numbers"), ("a,b,c,d", "four numbers"),
     ("-1,2,5,5", "outside"), ("1,2,5,-3", "zero area")],
)  # fmt: skip
def test_bad_boxes_are_refused_with_the_reason(text, message):
    with pytest.raises(BoxError, match=message):
        parse_box(text)


def test_a_box_must_lie_inside_its_image():
    image = Image.new("RGB", (100, 80))
    assert parse_box(" 10, 20 ,30,40") == (10, 20, 30, 40)
    assert check_box((10, 20, 30, 40), image) == (10, 20, 40, 60)
    with pytest.raises(BoxError, match="outside the image"):
        check_box((90, 20, 30, 40), image)
    image.info[ORIGIN_KEY] = (50, 5)  # a DICOM region: boxes are in full-frame pixels
    assert check_box((60, 25, 30, 40), image) == (10, 20, 40, 60)
    with pytest.raises(BoxError, match="B-mode region from x=50"):
        check_box((10, 20, 30, 40), image)


def test_crop_adds_the_margin_clips_and_jitters_reproducibly():
    image = Image.fromarray(np.arange(100 * 100, dtype=np.uint32).reshape(100, 100) % 251)
    image = image.convert("RGB")
    crop = crop_to_box(image, (10, 20, 30, 40), margin=0.5)
    assert crop.size == (55, 80)  # left edge clipped at 0: x from -5 to 55, y from 0 to 80
    torch.manual_seed(3)
    first = crop_to_box(image, (10, 20, 30, 40), margin=0.2, jitter=0.1)
    torch.manual_seed(3)
    again = crop_to_box(image, (10, 20, 30, 40), margin=0.2, jitter=0.1)
    other = crop_to_box(image, (10, 20, 30, 40), margin=0.2, jitter=0.1)
    assert first.tobytes() == again.tobytes()
    assert first.size != other.size or first.tobytes() != other.tobytes()
    assert abs(first.width - 42) <= 6 and abs(first.height - 56) <= 8


def test_boxes_from_masks_in_each_layout(tmp_path):
    mask = np.zeros((512, 512), np.uint8)
    mask[100:200, 300:340] = 255  # rows 100..199, columns 300..339
    (tmp_path / "benign").mkdir()
    Image.new("L", (256, 256)).save(tmp_path / "benign" / "a (1).png")
    Image.fromarray(mask).save(tmp_path / "benign" / "a (1)_mask.png")  # BUSI original
    second = np.zeros((512, 512), np.uint8)
    second[400:420, 10:20] = 255
    Image.fromarray(second).save(tmp_path / "benign" / "a (1)_mask_1.png")
    (tmp_path / "masks" / "benign").mkdir(parents=True)
    Image.new("L", (256, 256)).save(tmp_path / "benign" / "b.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "benign" / "b_mask.png")  # shared BUSI copy
    Image.new("L", (512, 512)).save(tmp_path / "benign" / "c.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "c_tumor.png")  # BrEaST
    assert len(find_masks(tmp_path / "benign" / "a (1).png", tmp_path)) == 2
    assert mask_box(find_masks(tmp_path / "benign" / "b.png", tmp_path), (256, 256)) == (
        150, 50, 20, 50,
    )  # fmt: skip
    assert mask_box(find_masks(tmp_path / "benign" / "c.png", tmp_path)) == (300, 100, 40, 100)
    both = mask_box(find_masks(tmp_path / "benign" / "a (1).png", tmp_path), (256, 256))
    assert both == (5, 50, 165, 160)  # around both lesions: x 5..170, y 50..210


def test_boxes_csv_and_missing_boxes(tmp_path, synthetic_data):
    table = tmp_path / "boxes.csv"
    table.write_text("path,x,y,w,h\nbenign/benign (1).png,1,2,3,4\nother.png,5,6,7,8\n")
    assert read_boxes_csv(table)["other.png"] == (5, 6, 7, 8)
    (tmp_path / "bad.csv").write_text('image,box\nx.png,"1,2,0,4"\n')
    with pytest.raises(DataError, match="line 2: box '1,2,0,4' has zero area"):
        read_boxes_csv(tmp_path / "bad.csv")
    dataset = scan_dataset(synthetic_data, ["benign", "malignant"])
    with pytest.raises(DataError, match=r"24 image.s. have no lesion box"):
        attach_boxes(dataset)  # no masks beside these images
    with pytest.raises(DataError, match=r"23 image.s. have no lesion box in .*boxes.csv"):
        attach_boxes(dataset, str(table))


def test_training_crops_are_seeded_per_epoch_and_never_preloaded(masked_data):
    dataset = attach_boxes(scan_dataset(masked_data, ["benign", "malignant"]))
    prep = Preprocessing(32, (0.0,) * 3, (1.0,) * 3, region="box", box_margin=0.2)

    def read(sample):
        return load_region(sample.input, prep, jitter=0.2)

    images = ImageDataset(dataset.samples[:4], build_decode_transform(prep), lambda x: x,
                          read=read, random_read=True)  # fmt: skip
    assert not images.preload(image_size=32, limit_mb=100)
    assert torch.equal(images[(0, 1)][0], images[(0, 1)][0])
    assert not torch.equal(images[(0, 1)][0], images[(1, 1)][0])


def test_roi_run_records_its_mode_and_boxes(roi_run):
    prep = read_model_file(roi_run / "model.pt")[0].preprocessing
    assert prep.region == "box" and prep.box_margin == pytest.approx(0.2)
    rows = list(csv.DictReader((roi_run / "split.csv").open()))
    assert all(parse_box(row["box"]) for row in rows)
    assert json.loads((roi_run / "metrics.json").read_text())["roc_auc"] is not None


def _predict(run, *paths, extra=()):
    return main(["predict", "--run", str(run), *map(str, paths), "--no-progress", *extra])


def test_predict_with_an_roi_model_needs_boxes(roi_run, masked_data, tmp_path, capsys):
    image = masked_data / "malignant" / "malignant (1).png"
    box = ",".join(map(str, mask_box(find_masks(image, masked_data))))
    capsys.readouterr()
    assert _predict(roi_run, image) == 2
    assert "classifies a lesion box" in capsys.readouterr().err
    out = tmp_path / "one.csv"
    assert _predict(roi_run, image, extra=["--box", box, "--out", str(out)]) == 0
    (row,) = csv.DictReader(out.open())
    in_box = ImageInput(image, 0, parse_box(box))
    (direct,) = predict_files(load_model(roi_run), [in_box], progress=False)
    assert row["box"] == box
    assert float(row["probability_malignant"]) == pytest.approx(direct.probability, abs=1e-5)
    assert _predict(roi_run, image, extra=["--box", "1,1,0,9"]) == 2
    assert "zero area" in capsys.readouterr().err
    table = tmp_path / "boxes.csv"
    table.write_text(f'path,box\n{image.name},"{box}"\nbenign (1).png,"250,250,40,40"\n')
    many = tmp_path / "many.csv"
    folder = [
        image,
        masked_data / "benign" / "benign (1).png",
        masked_data / "benign" / "benign (2).png",
    ]
    assert _predict(roi_run, *folder, extra=["--boxes", str(table), "--out", str(many)]) == 0
    rows = list(csv.DictReader(many.open()))
    assert_same_rows(rows[:1], [row])  # alone and in a batch: equal up to float noise
    assert "lies outside the image" in rows[1]["error"]
    assert "classifies a lesion box" in rows[2]["error"]  # not in the table


def test_a_whole_image_model_takes_no_box(masked_data, tmp_path, capsys):
    run = train_run(masked_data, tmp_path / "whole", *FAST, epochs=1)
    image = masked_data / "benign" / "benign (1).png"
    capsys.readouterr()
    assert _predict(run, image, extra=["--box", "1,1,9,9"]) == 2
    assert "trained on whole images" in capsys.readouterr().err


def test_api_box_field(roi_run, masked_data):
    image = masked_data / "malignant" / "malignant (2).png"
    box = ",".join(map(str, mask_box(find_masks(image, masked_data))))
    upload = [("files", (image.name, image.read_bytes()))]
    with TestClient(create_app(roi_run), raise_server_exceptions=False) as client:
        assert client.get("/model").json()["preprocessing"]["region"] == "box"
        missing = client.post("/predict", files=upload)
        assert missing.status_code == 422 and missing.json()["error"] == "bad_box"
        answered = client.post("/predict", files=upload, data={"box": box})
        assert answered.status_code == 200, answered.text
        (row,) = answered.json()["predictions"]
        in_box = ImageInput(image, 0, parse_box(box))
        (direct,) = predict_files(load_model(roi_run), [in_box], progress=False)
        assert row["box"] == box
        assert row["probability_malignant"] == pytest.approx(direct.probability, abs=1e-5)
        outside = client.post("/predict", files=upload, data={"box": "200,200,100,100"})
        assert outside.status_code == 422 and "outside the image" in outside.json()["detail"]
        two = client.post("/predict", files=upload * 2, data={"box": box})
        assert two.status_code == 422 and "one box per file" in two.json()["detail"]
        explained = client.post("/explain", files=[("file", upload[0][1])], data={"box": box})
        assert explained.status_code == 200 and explained.headers["content-type"] == "image/png"


def test_evaluate_with_other_boxes(roi_run, masked_data, tmp_path, capsys):
    dataset = attach_boxes(scan_dataset(masked_data, ["benign", "malignant"]))
    table = tmp_path / "wide.csv"
    rows = [f'{s.relpath},"{max(s.box[0] - 5, 0)},{max(s.box[1] - 5, 0)},{s.box[2] + 5},'
            f'{s.box[3] + 5}"' for s in dataset.samples]  # fmt: skip
    table.write_text("path,box\n" + "\n".join(rows) + "\n")
    out = tmp_path / "eval"
    args = ["evaluate", "--run", str(roi_run), "--data", str(masked_data), "--split", "all",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main([*args, "--boxes", str(table)]) == 0
    wide = list(csv.DictReader((out / "predictions.csv").open()))
    assert main([*args, "--out", str(tmp_path / "masks")]) == 0
    exact = list(csv.DictReader((tmp_path / "masks" / "predictions.csv").open()))
    assert len(wide) == len(exact) == 24
    assert [r["probability_malignant"] for r in wide] != [r["probability_malignant"] for r in exact]
    table.write_text('path,box\nnone.png,"1,1,5,5"\n')
    capsys.readouterr()
    assert main([*args, "--boxes", str(table)]) == 2
    assert "24 image(s) have no lesion box" in capsys.readouterr().err


def test_box_edges_are_inclusive_and_errors_name_the_image_and_its_size():
    image = Image.new("RGB", (40, 30))
    assert check_box((0, 0, 40, 30), image) == (0, 0, 40, 30)  # the whole image is a box
    assert check_box((39, 29, 1, 1), image) == (39, 29, 40, 30)  # one pixel in the corner
    assert parse_box("0,0,1,1") == (0, 0, 1, 1)
    for box in ((0, 0, 41, 30), (0, 0, 40, 31), (1, 0, 40, 30), (0, 1, 40, 30)):
        with pytest.raises(BoxError, match=re.escape(f"scan.png: box {box_to_text(box)} lies "
                                                      "outside the image (40x30)")):  # fmt: skip
            check_box(box, image, "scan.png")
    for box in ((0, 0, 0, 5), (0, 0, 5, 0)):
        with pytest.raises(BoxError, match=re.escape(f"scan.png: box {box_to_text(box)} has zero")):
            check_box(box, image, "scan.png")
    assert box_to_text((1, 2, 3, 4)) == "1,2,3,4" and box_to_text(None) is None
    region = Image.new("RGB", (20, 10))
    region.info[ORIGIN_KEY] = (5, 7)  # a DICOM's B-mode region inside its 25x17 frame
    assert check_box((5, 7, 20, 10), region) == (0, 0, 20, 10)
    with pytest.raises(BoxError, match=re.escape("(25x17, B-mode region from x=5, y=7)")):
        check_box((4, 7, 20, 10), region)
    with pytest.raises(BoxError, match=re.escape("(25x17, B-mode region from x=5, y=7)")):
        check_box((5, 6, 20, 10), region)
    only_y = Image.new("RGB", (20, 10))
    only_y.info[ORIGIN_KEY] = (0, 3)
    with pytest.raises(BoxError, match=re.escape("(20x13, B-mode region from x=0, y=3)")):
        check_box((0, 0, 20, 10), only_y)


def test_crop_rectangle_margin_jitter_and_the_smallest_crop():
    image = Image.new("RGB", (100, 80))
    assert crop_rectangle(image, (40, 30, 20, 10), margin=0.0) == (40, 30, 60, 40)
    assert crop_rectangle(image, (40, 30, 20, 10), margin=0.5) == (30, 25, 70, 45)
    assert crop_rectangle(image, (0, 0, 100, 80), margin=0.5) == (0, 0, 100, 80)  # clipped
    assert crop_to_box(image, (40, 30, 20, 10), margin=0.5).size == (40, 20)
    torch.manual_seed(0)
    shifts = np.array([
        np.subtract(crop_rectangle(image, (40, 30, 20, 10), margin=0.0, jitter=0.5),
                    (40, 30, 60, 40))
        for _ in range(200)
    ])  # fmt: skip
    assert np.abs(shifts[:, [0, 2]]).max() <= 10 and np.abs(shifts[:, [1, 3]]).max() <= 5
    assert (shifts < 0).any(axis=0).all() and (shifts > 0).any(axis=0).all()  # both ways
    assert abs(shifts.mean()) < 1.0  # centred on the box
    tiny = crop_rectangle(image, (10, 10, 1, 1), margin=0.0, jitter=1.0)
    assert tiny[2] - tiny[0] >= 1 and tiny[3] - tiny[1] >= 1  # never an empty crop
    with pytest.raises(BoxError, match=re.escape("ct.png: box 90,70,20,20 lies outside")):
        crop_to_box(image, (90, 70, 20, 20), margin=0.1, name="ct.png")


def test_colour_masks_read_by_their_brightest_channel(tmp_path):
    """BUS-UCLM stores masks in colour (green benign, red malignant): pure red is 76 in
    luminance, below the 127 cut, and was read as an empty mask."""
    from PIL import Image

    lesion = np.zeros((40, 60, 3), dtype=np.uint8)
    lesion[10:20, 5:25] = (255, 0, 0)  # red: a malignant lesion
    lesion[25:35, 40:55] = (0, 255, 0)  # green: a benign one
    Image.fromarray(lesion).save(tmp_path / "colour_mask.png")
    Image.fromarray(lesion.max(axis=2)).convert("L").save(tmp_path / "grey_mask.png")
    for name in ("colour_mask.png", "grey_mask.png"):
        read = np.asarray(read_mask([tmp_path / name], (60, 40))) > 0
        assert read.sum() == 10 * 20 + 10 * 15
        assert read[15, 10] and read[30, 45] and not read[0, 0]
