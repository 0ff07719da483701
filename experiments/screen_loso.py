"""Screen training levers on one held-out hospital, several seeds per arm, paired against the
baseline: the cheap first pass of the leave-one-site-out protocol (docs/multisite.md).

Each arm is the recommended recipe (``efficientnet-lite0``, 8 epochs, bf16) with a few ``--set``
overrides. Each (arm, seed) trains on every site but ``--held-out`` with ``busdx train`` and is
scored once on all of the held-out site's images with ``busdx evaluate``; the held-out site never
enters training, checkpoint choice or calibration. A killed screen resumes: finished runs are
skipped and an interrupted training continues from its ``last.pt``.

Reported per arm: each seed's AUC with its bootstrap CI, the seed-mean AUC and its paired
difference to the baseline's seed-mean (cases resampled once for all seeds of both arms), the
AUC of the seeds' mean logit (an ensemble) and its paired difference to the baseline's ensemble,
Dice where the arm outlines, and the training CPU time. A lever counts as a gain only when the
seed-mean difference's CI clears zero.

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
import subprocess
import sys
from pathlib import Path

import numpy as np

from busdx.fileio import atomic_write_text, json_safe
from busdx.metrics import paired_bootstrap, roc_auc

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
    "last": ["train.keep=last"],
    "mask": ["model.mask_head=true"],
    "unet": ["model.mask_head=true", "model.mask_decoder=unet"],
    "pad": ["data.resize=pad"],
    "lite1": ["model.name=efficientnet_lite1", "data.image_size=240"],
    "lite2": ["model.name=efficientnet_lite2", "data.image_size=260"],
    "res288": ["data.image_size=288"],
    "epochs30": ["train.epochs=30"],
    "ema": ["train.ema_epochs=1"],
    "shadow": ["augment.shadow=0.5"],
}
N_RESAMPLES = 2000


def run_arm(arm: str, seed: int, held_out: str, runs: Path) -> Path:
    """Train and evaluate one (arm, seed) unless done; returns its run directory."""
    run_dir = runs / held_out / f"{arm}-s{seed}"
    evaluation = run_dir / f"eval-{held_out}"
    if (evaluation / "predictions.csv").is_file():
        return run_dir
    started = os.times()
    if (run_dir / "last.pt").is_file():
        train = ["busdx", "train", "--resume", str(run_dir)]
    else:
        data = [f"--data={site}={path}" for site, path in SITES.items() if site != held_out]
        sets = [item for override in ARMS[arm] for item in ("--set", override)]
        train = ["busdx", "train", *BASE, *sets, *data, "--seed", str(seed), "--out",
                 str(run_dir)]
    print("$", " ".join(train), flush=True)
    subprocess.run(train, check=True)
    ended = os.times()
    cpu = sum(ended[:4]) - sum(started[:4])  # user + system, this process and its children
    evaluate = ["busdx", "evaluate", "--run", str(run_dir), "--split", "all",
                f"--data={held_out}={SITES[held_out]}", "--out", str(evaluation)]  # fmt: skip
    print("$", " ".join(evaluate), flush=True)
    subprocess.run(evaluate, check=True)
    history = list(csv.DictReader((run_dir / "history.csv").open()))
    cost = {"train_cpu_s_this_process": round(cpu, 1),  # a resumed run: its last part only
            "train_wall_s_this_process": round(ended.elapsed - started.elapsed, 1),
            "epoch_seconds_sum": round(sum(float(r["seconds"]) for r in history), 1)}  # fmt: skip
    atomic_write_text(run_dir / "screen-cost.json", json.dumps(cost, indent=2))
    return run_dir


def scores(run_dir: Path, held_out: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Paths (sorted), 0/1 labels and raw logits of one run's held-out predictions."""
    rows = list(csv.DictReader((run_dir / f"eval-{held_out}" / "predictions.csv").open()))
    rows.sort(key=lambda row: row["path"])
    labels = np.array([row["label"] == "malignant" for row in rows], dtype=int)
    return [row["path"] for row in rows], labels, np.array([float(r["logit"]) for r in rows])


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
    seed ensemble."""
    table: dict[str, dict] = {}
    paths = labels = None
    logits: dict[str, np.ndarray] = {}
    for arm in arms:
        columns, per_seed = [], {}
        for seed in seeds:
            run_dir = runs / held_out / f"{arm}-s{seed}"
            run_paths, y, logit = scores(run_dir, held_out)
            if paths is None:
                paths, labels = run_paths, y
            elif run_paths != paths:
                raise SystemExit(f"{run_dir}: its held-out images differ from the first run's")
            metrics = json.loads((run_dir / f"eval-{held_out}" / "metrics.json").read_text())
            cost = json.loads((run_dir / "screen-cost.json").read_text())
            outline = metrics.get("segmentation") or {}
            per_seed[seed] = {"auc": metrics["roc_auc"], "auc_ci": metrics["ci"]["roc_auc"],
                              "dice": outline.get("dice"),
                              "epoch_seconds": cost["epoch_seconds_sum"],
                              "train_cpu_s": cost.get("train_cpu_s_this_process")}  # fmt: skip
            columns.append(logit)
        logits[arm] = np.stack(columns, axis=1)
        table[arm] = {"overrides": ARMS[arm], "seeds": per_seed}
    index = np.arange(len(labels), dtype=float)
    base = logits["baseline"]
    for arm in arms:
        stacked = logits[arm]
        table[arm]["seed_mean_auc"] = seed_mean_auc(stacked)(labels, index)
        table[arm]["ensemble_auc"] = roc_auc(labels, stacked.mean(axis=1))
        if arm == "baseline":
            continue
        table[arm]["delta_seed_mean"] = paired_bootstrap(
            labels, index, index, seed_mean_auc(stacked), metric_b=seed_mean_auc(base),
            n_resamples=N_RESAMPLES)  # fmt: skip
        table[arm]["delta_ensemble"] = paired_bootstrap(
            labels, stacked.mean(axis=1), base.mean(axis=1), n_resamples=N_RESAMPLES
        )
    for combination in ensembles:
        members = np.concatenate([logits[arm] for arm in combination.split("+")], axis=1)
        table[combination] = {
            "models": members.shape[1], "ensemble_auc": roc_auc(labels, members.mean(axis=1)),
            "delta_ensemble": paired_bootstrap(labels, members.mean(axis=1), base.mean(axis=1),
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
    lines = ["| arm | AUC per seed | seed mean | Δ seed mean vs baseline [95% CI] | seeds' "
             "ensemble | Δ ensemble vs baseline's | Dice (mean of seeds) | CPU min per run |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, row in summary["arms"].items():
        if "seeds" not in row:  # an ensemble of arms
            lines.append(f"| {arm} ({row['models']} models) | | | | {row['ensemble_auc']:.3f} | "
                         f"{_delta(row['delta_ensemble'])} | | |")  # fmt: skip
            continue
        runs = list(row["seeds"].values())
        dice = [v["dice"] for v in runs if v["dice"] is not None]
        cpu = [v["train_cpu_s"] for v in runs if v["train_cpu_s"] is not None]
        aucs = ", ".join(f"{v['auc']:.3f}" for v in runs)
        lines.append(
            f"| {arm} | {aucs} | "
            f"{row['seed_mean_auc']:.3f} | {_delta(row.get('delta_seed_mean'))} | "
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
    parser.add_argument("--ensembles", nargs="*", default=[], metavar="ARM+ARM",
                        help="also score these arms' runs averaged (mean logit)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; summarise")
    args = parser.parse_args()
    arms = ["baseline", *[arm for arm in args.arms if arm != "baseline"]]
    if not args.report_only:
        for arm in arms:
            for seed in args.seeds:
                run_arm(arm, seed, args.held_out, args.runs)
    done = [a for a in arms if all((args.runs / args.held_out / f"{a}-s{s}" / "screen-cost.json")
                                   .is_file() for s in args.seeds)]  # fmt: skip
    ensembles = [e for e in args.ensembles if all(arm in done for arm in e.split("+"))]
    summary = summarise(done, args.seeds, args.held_out, args.runs, ensembles)
    atomic_write_text(args.out, json.dumps(json_safe(summary), indent=2))
    atomic_write_text(args.out.with_suffix(".md"), markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
