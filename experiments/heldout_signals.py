"""What the leave-one-site-out fold models do at the hospital each never saw, image by image:
the signals for an "uncertain" flag and the effect of unlabelled adaptation (AdaBN).

``score`` (resumable: one CSV per held-out site): each fold model scores its held-out site's
images with its logit, the logit of the horizontally flipped image, and the guard's feature
distance; then, for each BatchNorm ``--blends``, the site's images are split into two seeded
halves, the model's BatchNorm statistics are re-estimated on one half's images (no labels:
``busdx adapt``) and the other half is scored, and the other way round, so no image is scored
by statistics that saw it.

``analyse``: per site, (1) paired ΔAUC of each adaptation against the same model unadapted
(paired bootstrap), (2) each uncertainty signal judged by the error rates of the 10% of images
it flags (the flagging cut-off and the decision threshold both fitted on the other two sites'
images, cross-fitted) against the kept images.

Usage:
    python experiments/heldout_signals.py score --cv runs/loso3-lite0 --data-root ../shared/data \\
        --out docs/adaptation
    python experiments/heldout_signals.py analyse --scores docs/adaptation \\
        --out docs/adaptation/adaptation.json --signals-out docs/scope/uncertain-signals.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.special import logit

from busdx.config import load_config
from busdx.data.imaging import as_input
from busdx.data.preprocess import load_region
from busdx.inference.predictor import load_model
from busdx.layout import FOLDS_FILE, METRICS_FILE, fold_dir
from busdx.stats.calibration import fit_operating_points
from busdx.stats.metrics import paired_bootstrap, roc_auc
from busdx.workflows.adapt import adapt_batchnorm


def _logits_and_distances(loaded, files, *, flip=False, batch=32):
    logits, distances = [], []
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        images = [load_region(as_input(p), loaded.preprocessing) for p in chunk]
        x = loaded.inputs(images)
        if flip:
            x = np.ascontiguousarray(x[..., ::-1])
        out, dist, _ = loaded.predict(x)
        logits.append(np.asarray(out).ravel())
        missing = np.full(len(images), np.nan)
        distances.append(missing if dist is None else np.asarray(dist).ravel())
    return np.concatenate(logits), np.concatenate(distances)


def score(args):
    rows = list(csv.DictReader((Path(args.cv) / FOLDS_FILE).open()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for fold in sorted({int(r["fold"]) for r in rows}):
        mine = [r for r in rows if int(r["fold"]) == fold]
        site = mine[0]["site"]
        target = out / f"heldout-{site}.csv"
        if target.is_file():
            print(f"{target} exists: skipped")
            continue
        run = fold_dir(Path(args.cv), fold)
        if not (run / METRICS_FILE).is_file():
            print(f"{run} has not finished: skipped (run the same command again later)")
            continue
        files = [Path(args.data_root) / r["path"] for r in mine]
        loaded = load_model(run, device="cpu")
        base, distance = _logits_and_distances(loaded, files)
        flipped, _ = _logits_and_distances(loaded, files, flip=True)
        columns = {"logit": base, "logit_flip": flipped, "distance": distance}
        halves = np.random.default_rng(0).permutation(len(files)) % 2
        for blend in args.blends:
            adapted = np.zeros(len(files))
            for half in (0, 1):
                model = load_model(run, device="cpu")
                chosen = [files[i] for i in range(len(files)) if halves[i] == half]
                adapt_batchnorm(model, chosen, blend=blend, progress=False)
                other = [i for i in range(len(files)) if halves[i] != half]
                adapted[other], _ = _logits_and_distances(model, [files[i] for i in other])
            columns[f"logit_adabn_{blend:g}"] = adapted
        with target.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "site", "label", "half", *columns])
            for i, r in enumerate(mine):
                writer.writerow(
                    [
                        r["path"],
                        site,
                        r["label"],
                        halves[i],
                        *(f"{columns[c][i]:.6f}" for c in columns),
                    ]
                )
        print(f"{site}: {len(files)} images -> {target}")


def _read(folder):
    sites = {}
    for path in sorted(Path(folder).glob("heldout-*.csv")):
        rows = list(csv.DictReader(path.open()))
        site = rows[0]["site"]
        sites[site] = {"label": np.array([int(r["label"] == "malignant") for r in rows])} | {
            key: np.array([float(r[key]) for r in rows])
            for key in rows[0]
            if key.startswith(("logit", "distance"))
        }
    return sites


def analyse(args):
    sites = _read(args.scores)
    settings = load_config(recipe="efficientnet-lite0").evaluate
    adaptation, signals = {}, {}
    for site, data in sites.items():
        y = data["label"]
        adaptation[site] = {"n": len(y), "roc_auc": roc_auc(y, data["logit"]), "arms": {}}
        for key in [k for k in data if k.startswith("logit_adabn_")]:
            delta = paired_bootstrap(y, data[key], data["logit"], n_resamples=2000, seed=0)
            adaptation[site]["arms"][key.removeprefix("logit_adabn_")] = {
                "roc_auc": roc_auc(y, data[key]),
                "delta_roc_auc": delta,
            }
        others = [s for s in sites if s != site]
        y_ref = np.concatenate([sites[s]["label"] for s in others])
        x_ref = np.concatenate([sites[s]["logit"] for s in others])
        fitted = fit_operating_points(x_ref, y_ref, settings)
        temperature, cut = fitted.temperature, logit(fitted.threshold)
        wrong = (data["logit"] / temperature >= cut) != y.astype(bool)

        def signal(d, temperature=temperature, cut=cut):
            return {
                "near the threshold": -np.abs(d["logit"] / temperature - cut),
                "flip disagreement": np.abs(d["logit"] - d["logit_flip"]),
                "feature distance": d["distance"],
            }

        reference = {
            name: np.concatenate([signal(sites[s])[name] for s in others]) for name in signal(data)
        }
        signals[site] = {"n": len(y), "error_rate": float(wrong.mean()), "signals": {}}
        for name, values in signal(data).items():
            flagged = values > np.quantile(reference[name], 1 - args.share)
            kept_error = float(wrong[~flagged].mean())
            signals[site]["signals"][name] = {
                "flagged_share": float(flagged.mean()),
                "error_rate_flagged": float(wrong[flagged].mean()) if flagged.any() else None,
                "error_rate_kept": kept_error,
                "ratio": float(wrong[flagged].mean() / kept_error) if flagged.any() else None,
            }
    command = "python experiments/heldout_signals.py analyse --scores " + args.scores
    Path(args.out).write_text(
        json.dumps({"command": command, "sites": adaptation}, indent=2) + "\n"
    )
    Path(args.signals_out).write_text(
        json.dumps({"command": command, "share": args.share, "sites": signals}, indent=2) + "\n"
    )
    for site in sites:
        print(
            site,
            {k: round(v["delta_roc_auc"]["delta"], 3) for k, v in adaptation[site]["arms"].items()},
            {k: v["ratio"] and round(v["ratio"], 2) for k, v in signals[site]["signals"].items()},
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    s = sub.add_parser("score")
    s.add_argument("--cv", required=True)
    s.add_argument("--data-root", required=True)
    s.add_argument("--blends", type=float, nargs="+", default=[1.0, 0.5])
    s.add_argument("--out", required=True)
    s.set_defaults(func=score)
    a = sub.add_parser("analyse")
    a.add_argument("--scores", required=True)
    a.add_argument("--share", type=float, default=0.10)
    a.add_argument("--out", required=True)
    a.add_argument("--signals-out", required=True)
    a.set_defaults(func=analyse)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
