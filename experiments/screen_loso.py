"""Screen training levers on one held-out hospital, several seeds per arm, paired against the
baseline: the cheap first pass of the leave-one-site-out protocol (docs/multisite.md).

Each arm is the recommended recipe (``efficientnet-lite0``, 8 epochs, bf16) with a few ``--set``
overrides. Each (arm, seed) trains on every site but ``--held-out`` with ``busdx train`` and is
scored once on all of the held-out site's images with ``busdx evaluate``; the held-out site never
enters training, checkpoint choice or calibration. A killed screen resumes: finished runs are
skipped and an interrupted training continues from its ``last.pt``.

Every run is scored twice: with the weights it kept (lowest validation loss) and with its last
epoch's (the arm ``ARM@last``, what ``train.keep: last`` keeps; no retraining needed). With
``--flip`` each is also scored with flip test-time augmentation (``ARM:flip``, paired against
the same weights without it).
Reported per arm: each seed's AUC with its bootstrap CI, the seed-mean AUC and its paired
difference to the baseline's seed-mean (kept the same way; cases resampled once for all seeds
of both arms), the AUC of the seeds' mean logit (an ensemble) and its paired difference to the
baseline's ensemble, Dice where the arm outlines, and the training CPU time. The bootstrap
resamples cases, not trainings: a lever counts as a gain only when the seed-mean difference's
CI clears zero and every seed moves the same way.

Usage::

    BUSDX_WEIGHTS_DIR=../shared/weights python experiments/screen_loso.py \\
        --held-out bus_bra --seeds 42 7 --arms baseline mask pad \\
        --runs runs/screen --out docs/levers/screen-loso-bus_bra.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from busdx.fileio import atomic_write_text, json_safe
from busdx.inference.model_file import read_model_file, write_model_file
from busdx.stats.metrics import paired_bootstrap, roc_auc

SITES = {
    "busi": "../shared/data/busi",
    "bus_bra": "../shared/data/bus_bra",
    "breast": "../shared/data/breast_lesions_usg/labels.csv",
}
BASE = ["--recipe", "efficientnet-lite0", "--set", "train.epochs=8",
        "--set", "train.precision=bf16", "--set", "data.test_fraction=0"]  # fmt: skip
# arm -> the overrides it adds to the baseline recipe
ARMS: dict[str, list[str]] = {
    "baseline": [],
    "mask": ["model.mask_head=true"],
    "unet": ["model.mask_head=true", "model.mask_decoder=unet"],
    "mask-lr10": ["model.mask_head=true", "train.decoder_lr_scale=10"],
    # the released recipe at a higher resolution: for the outline as much as for the label
    "mask-lr10-288": ["model.mask_head=true", "train.decoder_lr_scale=10", "data.image_size=288"],
    # and with the pixels along the reader's outline weighing 5x in the mask's cross-entropy
    "mask-lr10-boundary": [
        "model.mask_head=true",
        "train.decoder_lr_scale=10",
        "train.mask_boundary_weight=4",
    ],
    "pad": ["data.resize=pad"],
    # the backbone alone, at the baseline's 224 px (input sizes are multiples of 32; the Lite
    # models' native 240 and 260 are not): resolution is its own arm
    "lite1": ["model.name=efficientnet_lite1"],
    "lite2": ["model.name=efficientnet_lite2"],
    "res288": ["data.image_size=288"],
    "epochs30": ["train.epochs=30"],
    "ema": ["train.ema_epochs=1"],
    "shadow": ["augment.shadow=0.5"],
}
N_RESAMPLES = 2000
COST_FILE = "screen-cost.json"
FLIP = "-flip"  # suffix of an evaluation folder scored with flip test-time augmentation


def run_arm(arm: str, seed: int, held_out: str, runs: Path, flip: bool = False) -> None:
    """Train one (arm, seed) unless done, then score on the held-out site both the weights the
    run kept (lowest validation loss) and its last epoch's (the arm ``ARM@last``), and with
    ``flip`` each of them with flip test-time augmentation too."""
    run_dir = runs / held_out / f"{arm}-s{seed}"
    if not (run_dir / COST_FILE).is_file():
        started = os.times()
        if (run_dir / "last.pt").is_file():
            train = ["busdx", "train", "--resume", str(run_dir)]
        else:
            data = [f"--data={site}={path}" for site, path in SITES.items() if site != held_out]
            sets = [item for override in ARMS[arm] for item in ("--set", override)]
            train = ["busdx", "train", *BASE, *sets, *data, "--seed", str(seed), "--out",
                     str(run_dir)]  # fmt: skip
        print("$", " ".join(train), flush=True)
        subprocess.run(train, check=True)
        ended = os.times()
        history = list(csv.DictReader((run_dir / "history.csv").open()))
        cost = {"train_cpu_s_this_process": round(sum(ended[:4]) - sum(started[:4]), 1),
                "train_wall_s_this_process": round(ended.elapsed - started.elapsed, 1),
                "epoch_seconds_sum": round(sum(float(r["seconds"]) for r in history), 1),
                "note": "CPU: user + system of the training process; a resumed run counts "
                        "its last part only"}  # fmt: skip
        atomic_write_text(run_dir / COST_FILE, json.dumps(cost, indent=2))
    for weights in (run_dir, last_epoch_run(run_dir, runs / held_out / f"{arm}@last-s{seed}")):
        for flipped in (False, True) if flip else (False,):
            evaluate(weights, held_out, flipped)


def last_epoch_run(run_dir: Path, target: Path) -> Path:
    """A copy of ``run_dir`` whose model is its last epoch's weights (the weights' average for
    an EMA run), uncalibrated: what ``train.keep: last`` would have kept."""
    if (target / "model.pt").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "run.json", "split.csv", COST_FILE):
        shutil.copy2(run_dir / name, target / name)
    info, last = read_model_file(run_dir / "last.pt")
    state = last["state_dict"]
    if "ema" in last:
        state = {k.removeprefix("module."): v for k, v in last["ema"].items()
                 if k != "n_averaged"}  # fmt: skip
    write_model_file(target / "model.pt", info, state_dict=state)
    return target


def evaluate(run_dir: Path, held_out: str, flip: bool = False) -> None:
    """``busdx evaluate`` on every image of the held-out site, unless done."""
    out = run_dir / f"eval-{held_out}{FLIP if flip else ''}"
    if (out / "predictions.csv").is_file():
        return
    command = ["busdx", "evaluate", "--run", str(run_dir), "--split", "all", "--no-progress",
               f"--data={held_out}={SITES[held_out]}", "--out", str(out)]  # fmt: skip
    print("$", " ".join(command + ["--flip"] * flip), flush=True)
    subprocess.run(command + ["--flip"] * flip, check=True)


def evaluation_dir(arm: str, seed: int, held_out: str, runs: Path) -> Path:
    """Where one (arm, seed)'s held-out evaluation is: ``ARM:flip`` is ``ARM``'s run scored
    with flip test-time augmentation."""
    run_name = f"{arm.removesuffix(':flip')}-s{seed}"
    return runs / held_out / run_name / f"eval-{held_out}{FLIP if arm.endswith(':flip') else ''}"


def scores(evaluation: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Paths (sorted), 0/1 labels and raw logits of one run's held-out predictions."""
    rows = list(csv.DictReader((evaluation / "predictions.csv").open()))
    rows.sort(key=lambda row: row["path"])
    labels = np.array([row["label"] == "malignant" for row in rows], dtype=int)
    return [row["path"] for row in rows], labels, np.array([float(r["logit"]) for r in rows])


def reference_arm(arm: str) -> str | None:
    """What an arm is paired against: the baseline kept the same way (``baseline@last`` for
    ``ARM@last``); ``baseline@last`` against the baseline (the choice of epoch itself);
    ``ARM:flip`` against ``ARM`` (what flipping adds to the same weights)."""
    if arm.endswith(":flip"):
        return arm.removesuffix(":flip")
    if arm == "baseline":
        return None
    if arm == "baseline@last":
        return "baseline"
    return "baseline@last" if arm.endswith("@last") else "baseline"


def seed_mean_auc(logits: np.ndarray):
    """A metric of case indices: the mean over seeds (columns of ``logits``) of each AUC."""

    def metric(y: np.ndarray, index: np.ndarray) -> float:
        rows = index.astype(int)
        return float(np.mean([roc_auc(y, logits[rows, s]) for s in range(logits.shape[1])]))

    return metric


def summarise(
    arms: list[str], seeds: list[int], held_out: str, runs: Path, ensembles: list[str]
) -> dict:
    """Per arm: AUC per seed, seed-mean and ensemble, each paired against the baseline; per
    ensemble of arms (``a+b``): the AUC of all their runs' mean logit, against the baseline's
    seed ensemble (kept the same way)."""
    table: dict[str, dict] = {}
    paths = labels = None
    logits: dict[str, np.ndarray] = {}
    for arm in arms:
        columns, per_seed = [], {}
        for seed in seeds:
            evaluation = evaluation_dir(arm, seed, held_out, runs)
            run_paths, y, logit = scores(evaluation)
            if paths is None:
                paths, labels = run_paths, y
            elif run_paths != paths:
                raise SystemExit(f"{evaluation}: its held-out images differ from the first run's")
            metrics = json.loads((evaluation / "metrics.json").read_text())
            cost = json.loads((evaluation.parent / COST_FILE).read_text())
            outline = metrics.get("segmentation") or {}
            per_seed[seed] = {"auc": metrics["roc_auc"], "auc_ci": metrics["ci"]["roc_auc"],
                              "dice": outline.get("dice"),
                              "epoch_seconds": cost["epoch_seconds_sum"],
                              "train_cpu_s": cost.get("train_cpu_s_this_process")}  # fmt: skip
            columns.append(logit)
        logits[arm] = np.stack(columns, axis=1)
        weights = arm.removesuffix(":flip")
        table[arm] = {"overrides": ARMS[weights.removesuffix("@last")], "seeds": per_seed,
                      "kept": "last epoch" if weights.endswith("@last") else "lowest val loss",
                      "flip": arm.endswith(":flip")}  # fmt: skip
    index = np.arange(len(labels), dtype=float)
    for arm in arms:
        stacked = logits[arm]
        table[arm]["seed_mean_auc"] = seed_mean_auc(stacked)(labels, index)
        table[arm]["ensemble_auc"] = roc_auc(labels, stacked.mean(axis=1))
        reference = reference_arm(arm)
        if reference is None:
            continue
        table[arm]["against"] = reference
        base = logits[reference]
        table[arm]["delta_seed_mean"] = paired_bootstrap(
            labels, index, index, seed_mean_auc(stacked), metric_b=seed_mean_auc(base),
            n_resamples=N_RESAMPLES)  # fmt: skip
        table[arm]["delta_ensemble"] = paired_bootstrap(
            labels, stacked.mean(axis=1), base.mean(axis=1), n_resamples=N_RESAMPLES
        )
    for combination in ensembles:
        arms_in = combination.split("+")
        reference = "baseline@last" if all("@last" in a for a in arms_in) else "baseline"
        members = np.concatenate([logits[arm] for arm in arms_in], axis=1)
        table[combination] = {
            "models": members.shape[1], "against": reference,
            "ensemble_auc": roc_auc(labels, members.mean(axis=1)),
            "delta_ensemble": paired_bootstrap(labels, members.mean(axis=1),
                                               logits[reference].mean(axis=1),
                                               n_resamples=N_RESAMPLES),
        }  # fmt: skip
    return {"held_out": held_out, "n": len(labels), "malignant": int(labels.sum()),
            "seeds": seeds, "base_command": BASE, "arms": table}  # fmt: skip


def _delta(result: dict | None) -> str:
    if result is None:
        return "—"
    return f"{result['delta']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}]"


def markdown(summary: dict) -> str:
    """The lever table: arm, AUC per seed, seed mean and its paired delta, ensemble, Dice, the
    training's CPU minutes (user + system, 2 cores: about twice the wall time)."""
    lines = ["| arm | kept | AUC per seed | seed mean | paired against | Δ seed mean [95% CI] | "
             "seeds' ensemble | Δ ensemble | Dice (mean of seeds) | CPU min per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, row in summary["arms"].items():
        if "seeds" not in row:  # an ensemble of arms
            ensemble = f"{row['ensemble_auc']:.3f} | {_delta(row['delta_ensemble'])}"
            lines.append(f"| {arm} ({row['models']} models) | | | | {row['against']} | | "
                         f"{ensemble} | | |")  # fmt: skip
            continue
        runs = list(row["seeds"].values())
        dice = [v["dice"] for v in runs if v["dice"] is not None]
        cpu = [v["train_cpu_s"] for v in runs if v["train_cpu_s"] is not None]
        aucs = ", ".join(f"{v['auc']:.3f}" for v in runs)
        lines.append(
            f"| {arm} | {row['kept']} | {aucs} | {row['seed_mean_auc']:.3f} | "
            f"{row.get('against', '—')} | {_delta(row.get('delta_seed_mean'))} | "
            f"{row['ensemble_auc']:.3f} | {_delta(row.get('delta_ensemble'))} | "
            f"{f'{np.mean(dice):.3f}' if dice else '—'} | "
            f"{f'{np.mean(cpu) / 60:.0f}' if cpu else '—'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held-out", choices=sorted(SITES), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=["baseline"])
    parser.add_argument("--runs", type=Path, default=Path("runs/screen"))
    parser.add_argument("--out", type=Path, required=True, help="summary JSON (and .md beside)")
    parser.add_argument(
        "--ensembles",
        nargs="*",
        default=[],
        metavar="ARM+ARM",
        help="also score these arms' runs averaged (mean logit)",
    )
    parser.add_argument(
        "--flip",
        action="store_true",
        help="also score every run with flip test-time augmentation (ARM:flip)",
    )
    parser.add_argument("--report-only", action="store_true", help="train nothing; summarise")
    args = parser.parse_args()
    trained = ["baseline", *[arm for arm in args.arms if arm != "baseline"]]
    if not args.report_only:
        for arm in trained:
            for seed in args.seeds:
                run_arm(arm, seed, args.held_out, args.runs, args.flip)
    arms = [name for arm in trained for name in (arm, f"{arm}@last")]
    arms += [f"{arm}:flip" for arm in arms] if args.flip else []
    done = [arm for arm in arms if all(
        (evaluation_dir(arm, seed, args.held_out, args.runs) / "metrics.json").is_file()
        for seed in args.seeds)]  # fmt: skip
    ensembles = [e for e in args.ensembles if all(arm in done for arm in e.split("+"))]
    summary = summarise(done, args.seeds, args.held_out, args.runs, ensembles)
    atomic_write_text(args.out, json.dumps(json_safe(summary), indent=2))
    atomic_write_text(args.out.with_suffix(".md"), markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
