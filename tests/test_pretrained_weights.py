"""The ImageNet weights load correctly: their frozen features separate real BUSI lesions.

A logistic-regression probe on globally pooled VGG16 features, cross-validated on a small real
subset of ../shared/data/busi, must reach a clearly higher ROC AUC with the ImageNet weights than
with the same network randomly initialised. Wrong channel order, wrong preprocessing or
scrambled weights all erase most of that gap.
"""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from busdx.config import ModelConfig
from busdx.data.datasets import scan_dataset
from busdx.data.imaging import load_image
from busdx.networks.classifier import create_model
from busdx.stats.metrics import roc_auc
from busdx.training.transforms import build_eval_transform

from conftest import BUSI_DIR, WEIGHTS_DIR, needs_shared

PER_CLASS = 40
IMAGE_SIZE = 224


def _probe_auc(weights: str, samples) -> float:
    torch.manual_seed(0)
    model, _, prep = create_model(ModelConfig(weights=weights), image_size=IMAGE_SIZE)
    transform = build_eval_transform(prep)
    with torch.inference_mode():
        images = torch.stack([transform(load_image(s.path)) for s in samples])
        features = torch.cat([model.features(batch).mean(dim=(2, 3)) for batch in images.split(20)])
    labels = np.array([s.label for s in samples])
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = cross_val_predict(probe, features.numpy(), labels, cv=folds, method="predict_proba")
    return roc_auc(labels, scores[:, 1])


@pytest.mark.slow
@needs_shared(BUSI_DIR)
@needs_shared(WEIGHTS_DIR)
def test_imagenet_features_beat_random_features_on_real_busi():
    samples = scan_dataset(BUSI_DIR, ["benign", "malignant"]).samples
    rng = np.random.default_rng(0)
    subset = [
        s
        for label in (0, 1)
        for s in rng.permutation([s for s in samples if s.label == label])[:PER_CLASS]
    ]
    imagenet, random = _probe_auc("imagenet", subset), _probe_auc("none", subset)
    print(f"probe ROC AUC: imagenet {imagenet:.3f}, random {random:.3f}")
    assert imagenet >= 0.78
    assert imagenet - random >= 0.10
