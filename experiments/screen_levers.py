"""Screen frozen-feature levers cheaply: backbone, pooling, geometry, annotation masking and
test-time flips.

Each variant extracts frozen ImageNet features once per image (and its mirror image) of BUSI
(benign + malignant) and of the external site, then fits the same regularised logistic
regression on them and measures it two ways:

* grouped, stratified 5-fold CV on BUSI (busdx's own folds: near-duplicates in one fold);
* trained on all of BUSI, tested on every image of the external site (never used to fit).

Each variant's AUCs come with 95% bootstrap CIs and a paired bootstrap difference against the
baseline variant (VGG16 block5, flattened, squashed: the recipe's features). This is a screen:
the levers that win here are then trained as busdx recipes and measured with ``busdx cv`` and
``busdx evaluate``. Features are cached in ``--cache`` so re-runs only refit.

Usage:
    python experiments/screen_levers.py --data ../shared/data/busi \\
        --external ../shared/data/breast_lesions_usg --out docs/levers/screen.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from busdx.config import ModelConfig, load_config
from busdx.data.datasets import scan_dataset
from busdx.data.imaging import load_image
from busdx.networks.classifier import create_model
from busdx.runs import prepare_dataset
from busdx.stats.metrics import bootstrap_ci, paired_bootstrap, roc_auc
from busdx.training.transforms import build_eval_transform
from busdx.workflows.crossval import assign_folds

# backbone -> {feature name: (layer indices whose global average is concatenated) or "flatten"}
TAPS = {
    "vgg16": {"flatten5": "flatten", "gap5": (30,), "gap345": (16, 23, 30)},
    "efficientnet_lite0": {"gap": (10,), "gap_multi": (5, 6, 10)},
}
# geometry / preprocessing variant -> the Preprocessing fields it changes
GEOMETRIES = {
    "squash": {},
    "pad": {"resize": "pad"},
    "crop": {"crop": "content"},
    "mask": {"annotations": "mask"},
}
BASELINE = "vgg16/flatten5/squash"


@torch.inference_mode()
def extract(backbone: str, geometry: str, paths: list[Path], cache: Path) -> dict[str, np.ndarray]:
    """Features of each image and of its mirror image: {tap: (n, 2, dim)}; cached on disk."""
    target = cache / f"{backbone}-{geometry}-{len(paths)}.npz"
    if target.is_file():
        return dict(np.load(target))
    model, _, prep = create_model(ModelConfig(name=backbone), image_size=224)
    transform = build_eval_transform(replace(prep, **GEOMETRIES[geometry]))
    model.eval()
    taps = TAPS[backbone]
    wanted = sorted({i for layers in taps.values() if layers != "flatten" for i in layers})
    out: dict[str, list] = {name: [] for name in taps}
    for start in tqdm(range(0, len(paths), 16), desc=f"{backbone} {geometry}"):
        images = torch.stack([transform(load_image(p)) for p in paths[start : start + 16]])
        batch = torch.cat([images, images.flip(-1)])
        pooled, x = {}, batch.contiguous(memory_format=torch.channels_last)
        for index, layer in enumerate(model.backbone):
            x = layer(x)
            if index in wanted:
                pooled[index] = x.mean(dim=(2, 3))
        for name, layers in taps.items():
            if layers == "flatten":
                value = x.flatten(1)
            else:
                value = torch.cat([pooled[i] for i in layers], 1)
            n = len(images)
            out[name].append(torch.stack([value[:n], value[n:]], 1).numpy())
    arrays = {name: np.concatenate(parts) for name, parts in out.items()}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(target, **arrays)
    return arrays


def fit_predict(x_train, y_train, x_test, seed: int) -> np.ndarray:
    """Logistic regression (C by inner 3-fold CV AUC) on original + mirrored training rows;
    returns test probabilities for original, mirrored, and their mean (TTA)."""
    rows = np.concatenate([x_train[:, 0], x_train[:, 1]])
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=np.logspace(-5, -1, 5).tolist(),
            cv=StratifiedKFold(3, shuffle=True, random_state=seed),
            scoring="roc_auc",
            max_iter=3000,
        ),
    )
    model.fit(rows, np.concatenate([y_train, y_train]))
    plain = model.predict_proba(x_test[:, 0])[:, 1]
    mirrored = model.predict_proba(x_test[:, 1])[:, 1]
    return np.stack([plain, (plain + mirrored) / 2])


def summarize(y: np.ndarray, scores: np.ndarray, baseline: np.ndarray | None) -> dict:
    ci = bootstrap_ci(y, scores, threshold=0.5, n_resamples=1000)["roc_auc"]
    result = {"roc_auc": roc_auc(y, scores), "ci": [ci["low"], ci["high"]]}
    if baseline is not None:
        result["vs_baseline"] = paired_bootstrap(y, scores, baseline, n_resamples=1000)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="BUSI folder (class folders)")
    parser.add_argument("--external", required=True, help="external site (class folders)")
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--cache", default="/tmp/busdx-screen", help="feature cache folder")
    parser.add_argument("--backbones", nargs="+", default=list(TAPS))
    parser.add_argument("--geometries", nargs="+", default=list(GEOMETRIES))
    parser.add_argument("--baseline", default=BASELINE, help="variant the others are paired with")
    args = parser.parse_args()
    torch.manual_seed(0)

    config = load_config()
    busi = prepare_dataset(config, args.data)
    folds = np.array(assign_folds(busi, 5, config.train.seed))
    site = scan_dataset(args.external, config.data.classes)
    y_busi = np.array([s.label for s in busi.samples])
    y_site = np.array([s.label for s in site.samples])
    paths = [s.path for s in busi.samples] + [s.path for s in site.samples]

    results, scores = {}, {}
    for backbone in args.backbones:
        for geometry in args.geometries:
            started = time.perf_counter()
            features = extract(backbone, geometry, paths, Path(args.cache))
            seconds = time.perf_counter() - started
            for tap, values in features.items():
                x_busi, x_site = values[: len(busi.samples)], values[len(busi.samples) :]
                cv = np.zeros((2, len(y_busi)))
                for fold in range(5):
                    test = folds == fold
                    cv[:, test] = fit_predict(x_busi[~test], y_busi[~test], x_busi[test], fold)
                external = fit_predict(x_busi, y_busi, x_site, 0)
                for tta, index in (("", 0), ("+flip", 1)):
                    name = f"{backbone}/{tap}/{geometry}{tta}"
                    scores[name] = (cv[index], external[index])
                    base = scores.get(args.baseline)
                    results[name] = {
                        "busi_cv": summarize(y_busi, cv[index], base and base[0]),
                        "external": summarize(y_site, external[index], base and base[1]),
                        "feature_seconds": round(seconds, 1),
                        "dim": int(values.shape[-1]),
                    }
                    cv_auc = results[name]["busi_cv"]["roc_auc"]
                    site_auc = results[name]["external"]["roc_auc"]
                    print(f"{name:<40} BUSI CV {cv_auc:.3f}  external {site_auc:.3f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python experiments/screen_levers.py "
        + " ".join(
            f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        ),
        "baseline": args.baseline,
        "n_busi": len(y_busi),
        "n_busi_malignant": int(y_busi.sum()),
        "n_external": len(y_site),
        "n_external_malignant": int(y_site.sum()),
        "variants": results,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    np.savez(out.with_suffix(".scores.npz"), y_busi=y_busi, y_site=y_site,
             **{f"{k}|cv": v[0] for k, v in scores.items()},
             **{f"{k}|external": v[1] for k, v in scores.items()})  # fmt: skip


if __name__ == "__main__":
    main()
