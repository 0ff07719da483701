"""How much does an image-level split of an augmented dataset inflate validation scores?

The popular Kaggle breast-ultrasound set is BUSI plus augmented copies (rotated, shifted,
zoomed, flipped), split at image level, so copies of one scan sit in both train and validation.
This rebuilds such a set from BUSI: every image becomes K copies (the recipe's own augmentation,
taken from the busdx feature cache, so VGG16 runs once per copy), then trains the recipe's head
on two splits of the same copies:

* leaky: copies shuffled into train/validation at random (what the Kaggle set does);
* grouped: all copies of a scan, and of its near-duplicates, on one side.

Usage: python experiments/leakage.py --data ../shared/data/busi --out docs/leakage.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from busdx.config import apply_overrides, load_config
from busdx.data.datasets import draw_split
from busdx.networks.classifier import create_model
from busdx.runs import prepare_dataset
from busdx.stats.metrics import roc_auc
from busdx.training.feature_cache import FeatureCache
from busdx.training.loop import evaluate, train_one_epoch


def _train_head(config, train_x, train_y, val_x, val_y, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model, _, _ = create_model(config.model, image_size=config.data.image_size, load_weights=False)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=config.train.lr)
    criterion = nn.BCEWithLogitsLoss()
    train = DataLoader(
        TensorDataset(train_x, train_y),
        batch_size=config.train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    val = DataLoader(TensorDataset(val_x, val_y), batch_size=256)
    cpu = torch.device("cpu")
    for _ in range(config.train.epochs):
        model.train()
        train_one_epoch(model.from_stem, train, optimizer, criterion, cpu)
    model.eval()
    _, accuracy = evaluate(model.from_stem, val, criterion, cpu)
    with torch.inference_mode():
        scores = torch.cat([model.from_stem(x) for x, _ in val]).numpy()
    return {"val_accuracy": accuracy, "val_roc_auc": roc_auc(val_y.numpy(), scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    config = apply_overrides(
        load_config(), ["train.feature_cache=true", f"train.cache_views={args.copies}"]
    )
    dataset = prepare_dataset(config, args.data, progress=True)
    model, weights, prep = create_model(config.model, image_size=config.data.image_size)
    cache = FeatureCache.for_config(config, weights, prep)
    views = list(range(1, args.copies + 1))
    cache.fill(model, dataset.samples, views, device=torch.device("cpu"))
    samples = dataset.samples
    features = torch.stack(
        [torch.from_numpy(np.array(cache.load(s, v))) for s in samples for v in views]
    )
    labels = torch.tensor([s.label for s in samples for _ in views], dtype=torch.float32)
    origin = np.repeat(np.arange(len(samples)), len(views))

    results = {"images": len(samples), "copies_per_image": len(views), "runs": []}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        leaky_val = rng.permutation(len(origin))[: int(0.2 * len(origin))]
        is_val = {"leaky": np.isin(np.arange(len(origin)), leaky_val)}
        grouped = draw_split(
            samples,
            val_fraction=0.2,
            test_fraction=0.0,
            seed=seed,
            groups=[s.group for s in samples],
        )
        val_images = {s.relpath for s in grouped if s.split == "val"}
        is_val["grouped"] = np.array([samples[i].relpath in val_images for i in origin])
        for split, mask in is_val.items():
            mask = torch.from_numpy(mask)
            scores = _train_head(
                config, features[~mask], labels[~mask], features[mask], labels[mask], seed
            )
            shared = len(set(origin[mask.numpy()]) & set(origin[~mask.numpy()]))
            row = {
                "split": split,
                "seed": seed,
                "val_copies": int(mask.sum()),
                "val_images_with_copies_in_train": shared,
                **scores,
            }
            print(row, flush=True)
            results["runs"].append(row)
    results["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
