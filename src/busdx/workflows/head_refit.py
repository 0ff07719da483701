"""Refit a trained model's last layer on a new site's own labelled cases (``busdx calibrate
--refit-head``).

Temperature and threshold (``busdx calibrate``) move the operating point but cannot change how
a model ranks a new site's lesions. Refitting the head's last linear layer can, but a site
rarely has more than a few dozen labelled cases, so the refit is *anchored*: it minimises the
cases' cross-entropy plus ``strength / 2 * ||w - w_trained||^2``, pulling the weights towards
the ones learned on the training data. The strength is chosen by k-fold cross-validation over
the local cases (including "infinite", which keeps the trained head), and the temperature and
threshold are fitted on the same out-of-fold logits (cross-fitting), so the local labels never
choose a threshold on scores they were fitted to.

Calibrating temperature and threshold alone is :mod:`busdx.workflows.calibrate`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit

from busdx.config import EvaluateConfig
from busdx.data.imaging import InputLike
from busdx.errors import DataError
from busdx.inference.batch import file_logits
from busdx.inference.predictor import Predictor
from busdx.stats.calibration import (
    Calibration,
    fit_operating_points,
    fit_temperature,
)
from busdx.stats.metrics import roc_auc

__all__ = ["STRENGTHS", "fit_anchored_layer", "fit_local_head", "last_layer_features", "refit_head"]

STRENGTHS = (math.inf, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01)  # inf: keep the trained head


def fit_anchored_layer(
    features: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: float, strength: float
) -> tuple[np.ndarray, float]:
    """Logistic regression on ``features`` whose weights are pulled towards ``weight``:
    minimises mean cross-entropy + ``strength / 2 * ||w - weight||^2`` (the bias is free).
    ``strength=inf`` returns the given weights and bias unchanged."""
    if math.isinf(strength):
        return weight, bias
    x = np.asarray(features, dtype=float)
    sign = np.where(np.asarray(labels) == 1, 1.0, -1.0)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[:-1], params[-1]
        margin = sign * (x @ w + b)
        shift = w - weight
        value = np.mean(np.logaddexp(0.0, -margin)) + strength / 2 * shift @ shift
        slope = -sign * expit(-margin) / len(x)  # d(mean loss) / d(logit)
        return value, np.append(x.T @ slope + strength * shift, slope.sum())

    start = np.append(weight, bias).astype(float)
    result = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return result.x[:-1], float(result.x[-1])


@contextmanager
def _last_layer_inputs(model: torch.nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Record what each member's final linear layer receives while the model runs."""
    layers = _last_layers(model)
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [
        layer.register_forward_hook(
            lambda _module, inputs, _output, store=store: store.append(inputs[0].float().cpu())
        )
        for layer, store in zip(layers, captured, strict=True)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _member_logits(features, labels, heads, strength, train, test) -> np.ndarray:
    """Mean over members of the refitted heads' logits on ``test`` (fitted on ``train``)."""
    logits = []
    for x, (weight, bias) in zip(features, heads, strict=True):
        w, b = fit_anchored_layer(x[train], labels[train], weight, bias, strength)
        logits.append(x[test] @ w + b)
    return np.mean(logits, axis=0)


Head = tuple[np.ndarray, float]  # (weights, bias) of one member's last linear layer


def last_layer_features(
    loaded: Predictor, paths: Sequence[InputLike], *, progress: bool = True
) -> tuple[list[np.ndarray], list[Head]]:
    """What each member's last linear layer receives for each file (n, d), and its weights."""
    if loaded.model is None:
        raise DataError("refitting the head needs the torch model (model.pt), not ONNX")
    with _last_layer_inputs(loaded.model) as captured:
        file_logits(loaded, list(paths), progress=progress)
    features = [torch.cat(parts).numpy().astype(float) for parts in captured]
    heads = [
        (layer.weight.detach().cpu().double().numpy()[0], float(layer.bias.detach().cpu()))
        for layer in _last_layers(loaded.model)
    ]
    return features, heads


def _last_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [member.head[-1] for member in getattr(model, "members", [model])]


def fit_local_head(
    features: list[np.ndarray],
    heads: list[Head],
    labels: np.ndarray,
    settings: EvaluateConfig,
    *,
    folds: int = 5,
    strengths: Sequence[float] = STRENGTHS,
) -> tuple[Calibration, list[Head]]:
    """Choose the anchor strength by k-fold CV over the cases (out-of-fold NLL after temperature
    scaling), fit the operating points on that strength's out-of-fold logits, and refit every
    member's last layer on all cases. Returns the operating points (with a ``head_refit``
    record) and the new heads."""
    labels = np.asarray(labels, dtype=int)
    k = min(folds, int(labels.sum()), int(len(labels) - labels.sum()))
    if k < 2:
        raise DataError("refitting the head needs at least 2 cases of each class")
    # imported here, not at the top: scikit-learn takes 1-2 s to import
    from sklearn.model_selection import StratifiedKFold

    folding = StratifiedKFold(k, shuffle=True, random_state=settings.seed)
    splits = list(folding.split(labels, labels))
    candidates = {}
    for strength in strengths:
        oof = np.zeros(len(labels))
        for train, test in splits:
            oof[test] = _member_logits(features, labels, heads, strength, train, test)
        temperature = fit_temperature(oof, labels)
        nll = float(np.mean(np.logaddexp(0.0, np.where(labels == 1, -1, 1) * oof / temperature)))
        candidates[strength] = (nll, oof)
    chosen = min(candidates, key=lambda s: (candidates[s][0], -s))  # ties: the stronger anchor
    head_refit = {
        "strength": None if math.isinf(chosen) else chosen,
        "kept_trained_head": math.isinf(chosen),
        "folds": k,
        "cases": {"n": len(labels), "n_positive": int(labels.sum())},
        "out_of_fold": {
            ("inf" if math.isinf(s) else str(s)): {"nll": nll, "roc_auc": roc_auc(labels, oof)}
            for s, (nll, oof) in candidates.items()
        },
    }
    fitted = fit_operating_points(candidates[chosen][1], labels, settings)
    fitted = fitted.replace(head_refit=head_refit)
    refitted = [
        fit_anchored_layer(x, labels, weight, bias, chosen)
        for x, (weight, bias) in zip(features, heads, strict=True)
    ]
    return fitted, refitted


def refit_head(
    loaded: Predictor,
    paths: Sequence[Path],
    labels: Sequence[int],
    settings: EvaluateConfig,
    *,
    progress: bool = True,
) -> tuple[Calibration, dict[str, Any]]:
    """Refit the last layer of ``loaded``'s head (each ensemble member's) on labelled files.

    Returns the operating points of :func:`fit_local_head` and the model's new ``state_dict``
    (``loaded`` is left as it was).
    """
    features, heads = last_layer_features(loaded, paths, progress=progress)
    fitted, refitted = fit_local_head(features, heads, np.asarray(labels), settings)
    names = {id(module): name for name, module in loaded.model.named_modules()}
    state = {key: value.detach().cpu().clone() for key, value in loaded.model.state_dict().items()}
    for layer, (w, b) in zip(_last_layers(loaded.model), refitted, strict=True):
        dtype = layer.weight.dtype
        state[f"{names[id(layer)]}.weight"] = torch.as_tensor(w[None], dtype=dtype)
        state[f"{names[id(layer)]}.bias"] = torch.as_tensor([b], dtype=dtype)
    return fitted, state
