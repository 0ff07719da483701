"""Prediction beyond one process: loader workers, job-array shards, bf16, and Ray."""

import csv
from pathlib import Path

import pytest

from busdx.cli import main
from busdx.data.inputs import iter_image_paths, parse_shard, take_shard
from busdx.data.synthetic import make_lesion_image
from busdx.errors import ConfigError
from busdx.inference.batch import predict_files
from busdx.inference.predictor import load_model

from conftest import assert_same_rows


@pytest.fixture(scope="module")
def run(trained_run):
    """The session's small trained run, with its fp32 ONNX export (conftest)."""
    return trained_run


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """300 synthetic scans in nested folders, and one broken file among them."""
    folder = tmp_path_factory.mktemp("many")
    for index in range(300):
        target = folder / f"site{index % 3}" / f"{index:04d}.png"
        target.parent.mkdir(exist_ok=True)
        make_lesion_image(index % 2 == 1, size=64, seed=index)[0].save(target)
    (folder / "site1" / "0150-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_loader_workers_give_the_same_rows_in_the_same_order(run, many_images):
    files = sorted(iter_image_paths([many_images]))[:70]
    predictor = load_model(run)
    alone = [r.to_dict() for r in predict_files(predictor, files, batch_size=8, progress=False)]
    helped = [r.to_dict() for r in predict_files(predictor, iter(files), batch_size=8,
                                                 workers=2, progress=False)]  # fmt: skip
    assert alone == helped
    assert [row["path"] for row in helped] == [str(path) for path in files]


def test_shards_share_the_images_out_exactly(run, many_images, tmp_path):
    outs = []
    for index in range(3):
        out = tmp_path / f"shard{index}.csv"
        assert main(["predict", "--run", str(run), "--shard", f"{index}/3", "--out", str(out),
                     "--no-progress", str(many_images)]) == 0  # fmt: skip
        outs.append(_rows(out))
    assert main(["predict", "--run", str(run), "--out", str(tmp_path / "all.csv"),
                 "--no-progress", str(many_images)]) == 0  # fmt: skip
    whole = _rows(tmp_path / "all.csv")
    assert_same_rows(sorted((r for rows in outs for r in rows), key=lambda r: r["path"]),
                     sorted(whole, key=lambda r: r["path"]))  # fmt: skip
    assert all(abs(len(rows) - len(whole) / 3) < 1 for rows in outs)


@pytest.mark.parametrize("shard", ["3/3", "1", "a/2", "-1/2"])
def test_a_bad_shard_is_a_one_line_error(shard):
    with pytest.raises(ConfigError, match="--shard must be I/N"):
        parse_shard(shard)
    assert list(take_shard(range(5), parse_shard(None))) == list(range(5))


def test_bf16_prediction_agrees_with_fp32(run, many_images):
    files = sorted(iter_image_paths([many_images]))[:40]
    fp32 = list(predict_files(load_model(run, device="cpu"), files, progress=False))
    bf16 = list(predict_files(load_model(run, device="cpu", precision="bf16"), files,
                              progress=False))  # fmt: skip
    pairs = [(a.probability, b.probability) for a, b in zip(fp32, bf16, strict=True) if a.error
             is None]  # fmt: skip
    assert pairs and max(abs(a - b) for a, b in pairs) < 0.05
    with pytest.raises(ConfigError, match="runs the torch model"):
        load_model(run, backend="onnx", precision="bf16")


def test_ray_predictions_equal_the_single_process_ones_and_resume(run, many_images, tmp_path):
    pytest.importorskip("ray")
    single = tmp_path / "single.csv"
    assert main(["predict", "--run", str(run), "--backend", "onnx", "--out", str(single),
                 "--no-progress", str(many_images)]) == 0  # fmt: skip
    out = tmp_path / "ray.csv"
    command = ["predict", "--run", str(run), "--ray", "--ray-workers", "2", "--out", str(out),
               "--no-progress", str(many_images)]  # fmt: skip
    assert main(command) == 0
    assert_same_rows(_rows(out), _rows(single))  # the same rows, in order
    rows = _rows(out)
    assert len(rows) == 301 and sum(bool(r["error"]) for r in rows) == 1

    # a crash that left one part: the re-run scores only the rest, and the result is the same
    parts = out.with_name("ray.csv.parts")
    for part in sorted(parts.glob("part-*.csv"))[1:]:
        part.unlink()
    kept = len(_rows(next(parts.glob("part-*.csv"))))
    from busdx.workflows.cluster import predict_on_ray

    summary = predict_on_ray(run, [many_images], out, workers=2, progress=False)
    assert (summary.skipped, summary.predicted) == (kept, 301 - kept)
    assert_same_rows(_rows(out), _rows(single))
    again = predict_on_ray(run, [many_images], tmp_path / "ray.parquet", workers=1,
                           progress=False)  # fmt: skip
    assert again.predicted == 301  # another output, its own parts
    import pyarrow.parquet

    table = pyarrow.parquet.read_table(tmp_path / "ray.parquet")
    assert table.column("path").to_pylist() == [r["path"] for r in rows]
    done = predict_on_ray(run, [many_images], out, workers=2, progress=False)
    assert done.predicted == 0  # idempotent
    assert_same_rows(_rows(out), _rows(single))


def test_ray_needs_an_output_file(run, many_images, capsys):
    assert main(["predict", "--run", str(run), "--ray", str(many_images)]) == 2
    assert "--ray needs --out" in capsys.readouterr().err
