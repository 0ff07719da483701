"""The REST API: answers, model card, security settings and every kind of bad input."""

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from busdx.cli import main
from busdx.data.synthetic import decompression_bomb_png
from busdx.errors import ConfigError
from busdx.serving import ServeSettings, check_bind, create_app


@pytest.fixture(scope="module")
def run(trained_run):
    """The session's small trained run, with its fp32 ONNX export (conftest)."""
    return trained_run


@pytest.fixture(scope="module")
def client(run):
    settings = ServeSettings(max_upload_mb=1.0, max_pixels=4_000_000)
    with TestClient(create_app(run, settings), raise_server_exceptions=False) as test_client:
        yield test_client


def _png(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _scan(seed: int = 0, size: int = 96) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    return Image.fromarray(pixels, mode="L")


def _post(client, files, path="/predict", field="files", **kwargs):
    return client.post(path, files=[(field, item) for item in files], **kwargs)


def test_health_and_model_card(client):
    assert client.get("/health").json() == {
        "status": "ok",
        "backend": "onnx",  # the run's fp32 export, under --backend auto
        "api_key_required": False,
    }
    card = client.get("/model").json()
    assert card["classes"] == ["benign", "malignant"] and 0 < card["threshold"] < 1
    assert card["preprocessing"]["image_size"] == 32
    assert card["training_data"]["counts"]["train"] == {"benign": 6, "malignant": 6}
    assert "not a medical device" in card["intended_use"]


def test_page_docs_and_openapi_work_offline(client):
    page = client.get("/").text
    assert "Research use only" in page and "http" not in page.split("<script>")[1]
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower() and "swagger-ui-bundle.js" in docs
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    assert {"/predict", "/explain", "/model", "/health"} <= set(
        client.get("/openapi.json").json()["paths"]
    )


def test_predict_one_and_several_with_a_bad_one(client):
    one = _post(client, [("scan.png", _png(_scan()), "image/png")])
    assert one.status_code == 200
    (row,) = one.json()["predictions"]
    (direct,) = client.app.state.service.predictor.decide_images([_scan()])
    assert row["probability_malignant"] == pytest.approx(direct.probability, abs=1e-6)
    assert row["label"] == direct.label
    assert one.json()["timing_ms"] > 0
    files = [("a.png", _png(_scan(1)), "image/png"), ("bad.png", b"not an image", "image/png"),
             ("c.jpg", _png(_scan(2), "JPEG"), "image/jpeg")]  # fmt: skip
    rows = _post(client, files).json()["predictions"]
    assert [r["filename"] for r in rows] == ["a.png", "bad.png", "c.jpg"]
    assert rows[1]["error"] and rows[1]["probability_malignant"] is None
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert isinstance(rows[0]["out_of_scope"], bool) and rows[1]["out_of_scope"] is None


def test_explain_returns_an_overlay_at_original_size(client):
    image = _scan(3, size=120).resize((150, 120))
    response = _post(client, [("scan.png", _png(image), "image/png")], "/explain", "file")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.size == (150, 120) and overlay.mode == "RGB"
    (direct,) = client.app.state.service.predictor.decide_images([image])
    assert float(response.headers["X-Probability"]) == pytest.approx(direct.probability, abs=1e-6)
    assert response.headers["X-Out-Of-Scope"] == str(direct.out_of_scope).lower()
    assert response.headers.get("X-Label") == direct.label  # none when out of scope
    as_json = client.post(
        "/explain?format=json", files={"file": ("s.png", _png(image), "image/png")}
    ).json()
    assert as_json["label"] == direct.label and as_json["overlay_png_base64"]


def _frames(fmt: str) -> bytes:
    frames = [_scan(seed).convert("P") for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


PNG = _png(_scan(4))
GOOD_VARIANTS = {
    "png named .jpg": ("scan.jpg", PNG),
    "16-bit grayscale": ("s16.png", _png(Image.fromarray(np.full((64, 64), 40000, np.uint16)))),
    "RGBA": ("rgba.png", _png(_scan(5).convert("RGBA"))),
    "palette": ("p.png", _png(_scan(6).convert("P"))),
    "CMYK JPEG": ("cmyk.jpg", _png(_scan(7).convert("CMYK"), "JPEG")),
    "animated GIF (first frame)": ("a.gif", _frames("GIF")),
    "multi-page TIFF (first page)": ("m.tiff", _frames("TIFF")),
}
BAD_INPUTS = {
    "zero bytes": (("empty.png", b""), 400, "empty"),
    "not an image": (("notes.png", b"hello, I am text"), 400, "not a readable image"),
    "truncated PNG": (("t.png", PNG[: len(PNG) // 2]), 400, "cannot decode"),
    "truncated JPEG": (("t.jpg", _png(_scan(8), "JPEG")[:300]), 400, "cannot decode"),
    "huge dimensions": (("big.png", _png(Image.new("1", (3000, 3000)))), 413, "exceeds the limit"),
    "decompression bomb": (("bomb.png", decompression_bomb_png()), 413, "900000000 pixels"),
    "over the size limit": (("big.bin", b"\0" * 1_200_000), 413, "upload exceeds"),
}


@pytest.mark.parametrize("name", GOOD_VARIANTS)
def test_unusual_but_valid_images_are_predicted(client, name):
    filename, data = GOOD_VARIANTS[name]
    response = _post(client, [(filename, data, "application/octet-stream")])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["error"] is None


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_uploads_get_a_clear_4xx_json_error(client, name):
    (filename, data), status, message = BAD_INPUTS[name]
    for path, field in (("/predict", "files"), ("/explain", "file")):
        response = _post(client, [(filename, data, "image/png")], path, field)
        assert response.status_code == status, response.text
        body = response.json()
        assert message in body["detail"] and "Traceback" not in response.text
    assert client.get("/health").status_code == 200  # still serving


def test_malformed_requests(client):
    missing = client.post("/predict", files={"image": ("s.png", PNG, "image/png")})
    assert missing.status_code == 422 and "body.files" in missing.json()["detail"]
    as_json = client.post("/predict", json={"files": "s.png"})
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["detail"]
    assert client.post("/explain?format=gif", files={"file": ("s.png", PNG)}).status_code == 422
    assert client.get("/nowhere").json()["error"] == "http_error"
    assert _post(client, [("scan.png", PNG, "image/png")]).status_code == 200  # still serving


def test_a_wrong_method_is_405_with_its_allow_header(client):
    """RFC 9110: a 405 names the methods the resource takes; a POST to a GET resource reaches
    the router (no upload checks first), and a GET to an upload route is 405 too."""
    for method, path, allowed in (("POST", "/model", "GET"), ("DELETE", "/health", "GET"),
                                  ("GET", "/predict", "POST")):  # fmt: skip
        answer = client.request(method, path)
        assert answer.status_code == 405, (method, path, answer.text)
        assert answer.headers["allow"] == allowed
        assert answer.json()["error"] == "http_error"


def test_the_schema_requires_at_least_one_file(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]
    form = schema["components"]["schemas"][
        body["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    ]
    assert body["required"] is True and "files" in form["required"]
    assert form["properties"]["files"]["minItems"] == 1
    for route in ("/predict", "/explain"):
        documented = schema["paths"][route]["post"]["responses"]
        assert {"400", "413", "415", "422", "501"} <= set(documented)
        assert documented["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "ErrorBody"
        )


def test_api_key_cors_and_bind_rules(run):
    app = create_app(run, ServeSettings(api_key="s3cret", cors_origins=("http://lab.example",)))
    with TestClient(app) as client:
        assert client.get("/health").json()["api_key_required"] is True
        assert _post(client, [("s.png", PNG, "image/png")]).status_code == 401
        ok = _post(client, [("s.png", PNG, "image/png")], headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        allowed = client.get("/health", headers={"Origin": "http://lab.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://lab.example"
    with TestClient(create_app(run)) as client:  # CORS off by default
        assert (
            "access-control-allow-origin"
            not in client.get("/health", headers={"Origin": "http://lab.example"}).headers
        )
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    with pytest.raises(ConfigError, match="API key"):
        check_bind("0.0.0.0", None, False)
    check_bind("0.0.0.0", "key", False)
    check_bind("0.0.0.0", None, True)


def test_a_full_queue_answers_503(run):
    with TestClient(create_app(run, ServeSettings(queue_size=0))) as client:
        response = _post(client, [("s.png", PNG, "image/png")])
        assert response.status_code == 503 and response.json()["error"] == "busy"


def test_predict_explain_writes_overlays(run, synthetic_data, tmp_path):
    images = sorted((synthetic_data / "malignant").glob("*.png"))[:3]
    out = tmp_path / "overlays"
    args = ["predict", "--run", str(run), *map(str, images), "--explain", str(out),
            "--out", str(tmp_path / "p.csv"), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    written = sorted(out.glob("*-gradcam.png"))
    assert len(written) == 3
    assert Image.open(written[0]).size == Image.open(images[0]).size


def test_settings_come_from_options_then_environment_then_defaults(monkeypatch):
    monkeypatch.setenv("BUSDX_MAX_FILES", "3")
    monkeypatch.setenv("BUSDX_API_KEY", "from-env")
    assert ServeSettings().max_files == 3 and ServeSettings().api_key == "from-env"
    given = ServeSettings.from_options(max_files=5, api_key=None, workers=None)
    assert (given.max_files, given.api_key, given.workers) == (5, "from-env", 1)
    with pytest.raises(ConfigError, match=r"serve setting workers: .*greater than or equal to 1"):
        ServeSettings.from_options(workers=0)
    monkeypatch.setenv("BUSDX_BACKEND", "tensorflow")
    with pytest.raises(ConfigError, match="serve setting backend"):
        ServeSettings.from_options()


def test_too_many_files_and_a_chunked_upload_over_the_limit(client):
    many = [(f"s{i}.png", PNG, "image/png") for i in range(33)]
    response = _post(client, many)
    assert response.status_code == 413 and response.json()["error"] == "too_many_files"

    def chunks():  # a streamed body declares no content-length: counted while read
        yield b"--b\r\nContent-Disposition: form-data; name=files; filename=x.png\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 32_768

    response = client.post(
        "/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413 and response.json()["error"] == "too_large"


def test_explain_gives_the_same_decision_as_predict_and_names_the_backend(client):
    upload = [("s.png", PNG, "image/png")]
    predicted = _post(client, upload).json()["predictions"][0]
    explained = _post(client, upload, "/explain?format=json", "file").json()
    assert explained["probability_malignant"] == pytest.approx(predicted["probability_malignant"],
                                                               abs=1e-5)  # fmt: skip
    served = client.app.state.service.predictor.backend  # the decision's; the overlay is torch's
    assert explained["label"] == predicted["label"] and explained["backend"] == served
    assert explained["overlay_backend"] == "torch"
    as_png = _post(client, upload, "/explain", "file")
    assert as_png.headers["X-Backend"] == served
    assert float(as_png.headers["X-Probability"]) == predicted["probability_malignant"]
