"""One predictor: predict, evaluate, serve and explain give the same probability and the same
label for the same image, on the torch backend and on the ONNX backend."""

import csv
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from busdx.cli import main
from busdx.data.imaging import load_image
from busdx.data.inputs import iter_image_paths
from busdx.inference.batch import predict_files
from busdx.inference.predictor import load_model
from busdx.networks.gradcam import explain_image
from busdx.serving import ServeSettings, create_app


@pytest.fixture(scope="module")
def run(trained_run):
    """The session's small trained run, with its fp32 ONNX export (conftest)."""
    return trained_run


def _by_name(rows):
    return {Path(row["path"] if "path" in row else row["filename"]).name: row for row in rows}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_every_path_gives_the_same_probability_and_label(run, synthetic_data, tmp_path, backend):
    images = sorted(iter_image_paths([synthetic_data]))[::3]  # 8 images, both classes
    predictor = load_model(run, backend=backend)
    direct = {path.name: row for path, row in zip(images, predict_files(predictor, images,
              progress=False), strict=True)}  # fmt: skip

    out = tmp_path / "eval"
    args = ["evaluate", "--run", str(run), "--data", str(synthetic_data), "--split", "all"]
    assert main([*args, "--backend", backend, "--out", str(out), "--no-progress"]) == 0
    evaluated = _by_name(csv.DictReader((out / "predictions.csv").open()))

    with TestClient(create_app(run, ServeSettings(backend=backend))) as client:
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
        served = _by_name(client.post("/predict", files=files).json()["predictions"])
        explained = client.post(
            "/explain?format=json", files=[("file", files[0][1])]
        ).json()  # decided by the served backend

    for name, row in direct.items():
        probability = row.probability
        # float32 noise of other batches and thread counts, plus rounding to 6 places
        assert float(evaluated[name]["probability_malignant"]) == pytest.approx(
            probability, abs=2e-6
        )
        assert served[name]["probability_malignant"] == pytest.approx(probability, abs=2e-6)
        decided = "malignant" if probability >= predictor.threshold else "benign"
        assert evaluated[name]["predicted"] == decided  # an evaluation decides every image
        shown = None if row.out_of_scope else decided  # predict and serve: none out of scope
        assert row.label == served[name]["label"] == shown
    assert explained["probability_malignant"] == pytest.approx(direct[images[0].name].probability,
                                                               abs=2e-6)  # fmt: skip
    if backend == "torch":  # Grad-CAM's own forward pass decides the same way
        explanation = explain_image(predictor, load_image(images[0]))
        assert explanation.probability == pytest.approx(
            direct[images[0].name].probability, abs=2e-6
        )


def test_probabilities_are_float64_whatever_the_logits(run):
    predictor = load_model(run)
    logits = np.array([-3.0, 0.0, 2.5], dtype=np.float32)
    probabilities = predictor.probabilities(logits)
    assert probabilities.dtype == np.float64
    expected = 1 / (1 + np.exp(-logits.astype(np.float64) / predictor.temperature))
    np.testing.assert_allclose(probabilities, expected, rtol=1e-12)
    at = predictor.threshold
    assert predictor.decide(np.array([at, np.nextafter(at, 0)])).tolist() == [True, False]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_probability_equal_to_the_threshold_is_malignant(run, synthetic_data, backend):
    """The decision rule at its edge: p >= threshold is positive, the next float above p is
    not reached, on both backends (a ``>`` anywhere would flip the first case)."""
    image = sorted(iter_image_paths([synthetic_data]))[0]
    predictor = load_model(run, backend=backend)
    (row,) = predict_files(predictor, [image], progress=False)
    at = next(iter(predict_files(predictor, [image], threshold=row.probability, progress=False)))
    above = np.nextafter(row.probability, 1.0)
    past = next(iter(predict_files(predictor, [image], threshold=above, progress=False)))
    assert (at.label, past.label) == ("malignant", "benign")
