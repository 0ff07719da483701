"""Training under torchrun: 2 CPU processes (gloo, loopback) against 1 process."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from busdx.training.loading import EpochSampler

# dropout 0: with it, each process would draw other dropout masks than one process does
SETTINGS = [
    "data.image_size=32",
    "model.weights=none",
    "model.dropout=0",
    "train.batch_size=8",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
    "data.num_workers=1",
]


def _train(data: Path, out: Path, processes: int, *extra: str, resume: bool = False) -> None:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={processes}", "-m", "busdx"]
        if processes > 1 else [sys.executable, "-m", "busdx"]
    )  # fmt: skip
    target = ["--resume", str(out)] if resume else ["--data", str(data), "--out", str(out)]
    settings = [arg for item in (*SETTINGS, *extra) for arg in ("--set", item)]
    done = subprocess.run([*launcher, "train", *target, *settings, "--no-progress"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _history(run: Path) -> list[dict[str, float]]:
    with (run / "history.csv").open() as handle:
        return [{k: float(v) for k, v in row.items() if k != "seconds"}
                for row in csv.DictReader(handle)]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from busdx.data.synthetic import write_synthetic_dataset

    # 16 + 16 images: 16 to train, divisible by the 2 x 4 images of each global batch
    return write_synthetic_dataset(tmp_path_factory.mktemp("ddp"), n_per_class=16, seed=1)


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory) -> Path:
    """A 3-epoch run of 2 torchrun processes."""
    run = tmp_path_factory.mktemp("two") / "run"
    _train(data, run, 2, "train.epochs=3")
    return run


def test_two_processes_train_the_model_one_process_trains(data, two_processes, tmp_path):
    _train(data, tmp_path / "one", 1, "train.epochs=3")
    one, two = _history(tmp_path / "one"), _history(two_processes)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):  # same global batches; sums in another order
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # rank 0 alone wrote the run: one model file, one report, nothing twice
    assert sorted(p.name for p in two_processes.iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


def test_a_torchrun_run_resumes_under_torchrun_as_if_never_stopped(data, two_processes, tmp_path):
    _train(data, tmp_path / "resumed", 2, "train.epochs=2")  # "killed" after epoch 2
    _train(data, tmp_path / "resumed", 2, "train.epochs=3", resume=True)
    straight, resumed = _history(two_processes), _history(tmp_path / "resumed")
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_a_batch_that_does_not_split_evenly_is_refused(data, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "-m", "busdx", "train", "--data", str(data), "--out",
                str(tmp_path / "odd"), "--no-progress"]  # fmt: skip
    settings = [arg for item in (*SETTINGS, "train.batch_size=7") for arg in ("--set", item)]
    done = subprocess.run([*launcher, *settings], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "train.batch_size (7) must be a multiple of the number of processes (2)" in done.stderr


def test_processes_share_the_one_process_batches():
    """Rank r of N takes every N-th index of the one-process order: each global batch holds
    the same images as with one process."""
    indices = list(range(20))
    one = [i for _, i in _epoch(EpochSampler(indices, seed=3), 4)]
    ranks = [[i for _, i in _epoch(EpochSampler(indices, seed=3, rank=r, world_size=2), 4)]
             for r in range(2)]  # fmt: skip
    for batch in range(2):  # global batch of 8 = 4 from each process
        from_ranks = ranks[0][4 * batch : 4 * batch + 4] + ranks[1][4 * batch : 4 * batch + 4]
        assert sorted(from_ranks) == sorted(one[8 * batch : 8 * batch + 8])
    assert {epoch for epoch, _ in _epoch(EpochSampler(indices, seed=3), 4)} == {4}


def _epoch(sampler: EpochSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)
