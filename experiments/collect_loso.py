"""Evidence of leave-one-site-out studies for docs/: each study's summary and out-of-site
predictions, and paired comparisons of studies site by site (the same held-out images, scored by
two recipes' fold models), with the mean of several studies' logits as an ensemble::

    python experiments/collect_loso.py --out docs/multisite \\
        --study lite0=runs/loso3-lite0 --study balanced=runs/loso3-lite0-balanced \\
        --compare balanced:lite0 --ensemble lite0+seed7 \\
        --evaluations seeds-breast=runs/loso3-lite0/fold-2/eval-breast,runs/seed7/eval-breast
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np

from busdx.config import EvaluateConfig
from busdx.evaluation.compare import compare_evaluations
from busdx.fileio import atomic_write_text, json_safe
from busdx.stats.metrics import bootstrap_ci, paired_bootstrap, roc_auc


def fold_predictions(study: Path) -> dict[str, list[dict[str, str]]]:
    """Each held-out site's prediction rows (path, label, probability, logit), by site."""
    folds = {}
    with (study / "folds.csv").open(newline="") as handle:
        site_of = {row["path"]: row["site"] for row in csv.DictReader(handle)}
    for fold in sorted(study.glob("fold-*")):
        with (fold / "predictions.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        folds[site_of[rows[0]["path"]]] = rows
    return folds


def write_oof(study: Path, target: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "site", "label", "probability_malignant", "logit", "predicted"])
    for site, rows in fold_predictions(study).items():
        for row in rows:
            writer.writerow([row["path"], site, row["label"], row["probability_malignant"],
                             row["logit"], row["predicted"]])  # fmt: skip
    atomic_write_text(target, buffer.getvalue())


def ensemble(studies: list[Path], n_resamples: int) -> dict:
    """Per site: the mean of the studies' raw logits as one score, its AUC with CI, and the
    paired difference to the first study alone."""
    parts = [fold_predictions(study) for study in studies]
    result = {}
    for site, rows in parts[0].items():
        order = [row["path"] for row in rows]
        y = np.array([row["label"] == "malignant" for row in rows], dtype=int)
        logits = []
        for part in parts:
            by_path = {row["path"]: float(row["logit"]) for row in part[site]}
            logits.append(np.array([by_path[path] for path in order]))
        mean = np.mean(logits, axis=0)
        ci = bootstrap_ci(y, mean, threshold=0.0, n_resamples=n_resamples)["roc_auc"]
        result[site] = {
            "members": [str(s) for s in studies],
            "each_roc_auc": [roc_auc(y, member) for member in logits],
            "ensemble_roc_auc": roc_auc(y, mean),
            "ensemble_ci": ci,
            "ensemble_vs_first": paired_bootstrap(y, mean, logits[0], n_resamples=n_resamples),
        }
    return result


def against_baseline(study: Path, site: str, baseline: Path, n_resamples: int) -> dict:
    """The study's model at ``site`` against earlier predictions of the same images (a
    predictions CSV with path, label and probability_malignant), matched by file name: paired
    ΔAUC (study minus baseline)."""
    if (study / "predictions.csv").is_file() and not (study / "folds.csv").is_file():
        with (study / "predictions.csv").open(newline="") as handle:  # a busdx evaluate folder
            rows = list(csv.DictReader(handle))
    else:
        rows = fold_predictions(study)[site]
    with baseline.open(newline="") as handle:
        earlier = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    names = [Path(row["path"]).name for row in rows]
    if set(names) != set(earlier):
        raise SystemExit(f"{baseline} does not hold the same images as {study} at {site}")
    y = np.array([row["label"] == "malignant" for row in rows], dtype=int)
    new = np.array([float(row["probability_malignant"]) for row in rows])
    old = np.array([float(earlier[name]["probability_malignant"]) for name in names])
    return {
        "study": str(study),
        "baseline": str(baseline),
        "site": site,
        "delta_roc_auc": paired_bootstrap(y, new, old, n_resamples=n_resamples),
    }


def evaluations_ensemble(folders: list[Path], n_resamples: int) -> dict:
    """Evaluations of one site by several models (``busdx evaluate`` folders): each one's AUC,
    the paired difference of the second minus the first (run-to-run spread when they differ
    only by seed), and the mean of their raw logits as an ensemble, paired against the first."""
    tables = []
    for folder in folders:
        with (folder / "predictions.csv").open(newline="") as handle:
            tables.append({row["path"]: row for row in csv.DictReader(handle)})
    order = sorted(tables[0])
    if any(set(table) != set(order) for table in tables):
        raise SystemExit("the evaluations scored different images")
    y = np.array([tables[0][path]["label"] == "malignant" for path in order], dtype=int)
    logits = [np.array([float(table[path]["logit"]) for path in order]) for table in tables]
    mean = np.mean(logits, axis=0)
    return {
        "members": [str(folder) for folder in folders],
        "each_roc_auc": [roc_auc(y, member) for member in logits],
        "second_minus_first": paired_bootstrap(y, logits[1], logits[0], n_resamples=n_resamples),
        "ensemble_roc_auc": roc_auc(y, mean),
        "ensemble_ci": bootstrap_ci(y, mean, threshold=0.0, n_resamples=n_resamples)["roc_auc"],
        "ensemble_vs_first": paired_bootstrap(y, mean, logits[0], n_resamples=n_resamples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--study", action="append", default=[], help="NAME=CV_FOLDER")
    parser.add_argument("--compare", action="append", default=[], help="A:B (A minus B)")
    parser.add_argument("--ensemble", action="append", default=[], help="A+B[+C]")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="STUDY:SITE=PREDICTIONS.csv (earlier predictions of that site); "
        "STUDY may be a busdx evaluate folder",
    )
    parser.add_argument(
        "--evaluations",
        action="append",
        default=[],
        help="NAME=EVAL_DIR,EVAL_DIR[,...]: one site scored by several models",
    )
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    studies = dict(item.split("=", 1) for item in args.study)
    studies = {name: Path(folder) for name, folder in studies.items()}
    for name, folder in studies.items():
        shutil.copyfile(folder / "cv_metrics.json", args.out / f"{name}-cv_metrics.json")
        shutil.copyfile(folder / "folds.csv", args.out / f"{name}-folds.csv")
        write_oof(folder, args.out / f"{name}-oof-predictions.csv")
    settings = EvaluateConfig(n_bootstrap=args.n_bootstrap)
    for pair in args.compare:
        a, b = pair.split(":")
        sites = {
            fold.name: compare_evaluations(fold, studies[b] / fold.name, settings)
            for fold in sorted(studies[a].glob("fold-*"))
        }
        dumped = {fold: result.model_dump(mode="json") for fold, result in sites.items()}
        target = args.out / f"compare-{a}-vs-{b}.json"
        atomic_write_text(target, json.dumps(json_safe(dumped), indent=2) + "\n")
        for fold, result in sites.items():
            delta = result.roc_auc
            print(f"{a} - {b}, {fold}: ΔAUC {delta.delta:+.3f} "
                  f"[{delta.low:+.3f}, {delta.high:+.3f}]")  # fmt: skip
    for item in args.baseline:
        where, csv_path = item.split("=", 1)
        name, site = where.split(":")
        study = studies.get(name, Path(name))  # a study's name, or an evaluation folder
        result = against_baseline(study, site, Path(csv_path), args.n_bootstrap)
        name = name if name in studies else Path(name).parent.name
        target = args.out / f"baseline-{name}-{site}-vs-{Path(csv_path).stem}.json"
        atomic_write_text(target, json.dumps(json_safe(result), indent=2) + "\n")
        delta = result["delta_roc_auc"]
        print(
            f"{name} at {site} minus {Path(csv_path).name}: ΔAUC {delta['delta']:+.3f} "
            f"[{delta['low']:+.3f}, {delta['high']:+.3f}]"
        )
    for item in args.evaluations:
        name, folders = item.split("=", 1)
        result = evaluations_ensemble([Path(f) for f in folders.split(",")], args.n_bootstrap)
        target = args.out / f"evaluations-{name}.json"
        atomic_write_text(target, json.dumps(json_safe(result), indent=2) + "\n")
        spread, ens = result["second_minus_first"], result["ensemble_vs_first"]
        print(
            f"{name}: AUCs {', '.join(f'{v:.3f}' for v in result['each_roc_auc'])}; second "
            f"minus first {spread['delta']:+.3f} [{spread['low']:+.3f}, {spread['high']:+.3f}]; "
            f"ensemble {result['ensemble_roc_auc']:.3f}, vs first {ens['delta']:+.3f} "
            f"[{ens['low']:+.3f}, {ens['high']:+.3f}]"
        )
    for combo in args.ensemble:
        names = combo.split("+")
        result = ensemble([studies[n] for n in names], args.n_bootstrap)
        target = args.out / f"ensemble-{'-'.join(names)}.json"
        atomic_write_text(target, json.dumps(json_safe(result), indent=2) + "\n")
        for site, row in result.items():
            delta = row["ensemble_vs_first"]
            print(
                f"ensemble {combo} at {site}: AUC {row['ensemble_roc_auc']:.3f} "
                f"(members {', '.join(f'{v:.3f}' for v in row['each_roc_auc'])}); vs "
                f"{names[0]} {delta['delta']:+.3f} [{delta['low']:+.3f}, {delta['high']:+.3f}]"
            )


if __name__ == "__main__":
    main()
