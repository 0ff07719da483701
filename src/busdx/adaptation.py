"""Adapt a trained model to a new site: refit its last layer on the site's own labelled cases.

Temperature and threshold (``busdx calibrate``) move the operating point but cannot change how
a model ranks a new site's lesions. Refitting the head's last linear layer can, but a site
rarely has more than a few dozen labelled cases, so the refit is *anchored*: it minimises the
cases' cross-entropy plus ``strength / 2 * ||w - w_trained||^2``, pulling the weights towards
the ones learned on the training data. The strength is chosen by k-fold cross-validation over
the local cases (including "infinite", which keeps the trained head), and the temperature and
threshold are fitted on the same out-of-fold logits (cross-fitting), so the local labels never
choose a threshold on scores they were fitted to.

:func:`calibrate_model` fits temperature and thresholds (after training, on the validation
split); :func:`calibrate_run` is ``busdx calibrate``: a copy of a run refitted on a site's cases.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit

from busdx.bundled import output_home, resolve_run
from busdx.calibration import (
    Calibration,
    apply_temperature,
    fit_operating_points,
    fit_temperature,
    sensitivity_promise,
    transfer_threshold,
)
from busdx.config import EvaluateConfig, apply_overrides
from busdx.data import Sample
from busdx.errors import DataError
from busdx.fileio import write_json
from busdx.imaging import InputLike
from busdx.inference import file_logits
from busdx.layout import CONFIG_FILE, INFO_FILE, MODEL_FILE, SPLIT_FILE
from busdx.metrics import roc_auc
from busdx.model_file import ModelInfo, update_model_file
from busdx.predictor import Predictor, load_model
from busdx.runs import create_run_dir, load_run, samples_for_split, save_config

__all__ = [
    "STRENGTHS",
    "CalibratedRun",
    "calibrate_model",
    "calibrate_run",
    "fit_anchored_layer",
    "fit_local_head",
    "last_layer_features",
    "refit_head",
]

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


def calibrate_model(
    run_dir: Path,
    loaded: Predictor,
    val_samples: list[Sample],
    settings: EvaluateConfig,
    *,
    source: str = "validation split",
    refit: bool = False,
    progress: bool = True,
    prior: ModelInfo | None = None,
) -> Calibration:
    """Fit temperature and thresholds on ``val_samples``; store them in ``run_dir/model.pt``.

    After training these are the validation split's images; ``busdx calibrate`` passes a new
    site's own labelled cases (``source`` then says so). With ``refit`` the head's last layer
    is refitted on them too (:func:`busdx.adaptation.refit_head`; cross-fitted threshold).
    ``prior``: what the model file said before, whose threshold is kept as a floor where the
    cases cannot show the target sensitivity (:func:`_keep_floor`). ``loaded`` stays as it
    was: load the run again for the recalibrated model.
    """
    labels = np.array([s.label for s in val_samples])
    paths = [s.input for s in val_samples]
    updates = {}
    if refit:
        fitted, updates["state_dict"] = refit_head(
            loaded, paths, labels, settings, progress=progress
        )
    else:
        logits = file_logits(loaded, paths, progress=progress)
        fitted = fit_operating_points(logits, labels, settings)
    fitted = fitted.replace(source=source)
    if prior is not None and fitted.sensitivity_promise and not refit:
        probabilities = apply_temperature(logits, fitted.temperature)
        fitted = _keep_floor(fitted, prior, labels, probabilities, settings)
    update_model_file(run_dir / MODEL_FILE, loaded.info.calibrated_with(fitted), **updates)
    return fitted


@dataclass(frozen=True)
class CalibratedRun:
    """The new run of :func:`calibrate_run`, the site it was fitted to, and what was fitted
    (temperature, threshold, operating points, cases, the sensitivity promise; ``head_refit``
    with ``refit``; ``threshold_floor`` where the model's own threshold was kept as a floor)."""

    run_dir: Path
    site: str
    fitted: Calibration


def _keep_floor(fitted: Calibration, prior: ModelInfo, labels, probabilities,
                settings: EvaluateConfig) -> Calibration:  # fmt: skip
    """Where the local cases cannot show the target sensitivity at the asked confidence, never
    be less cautious than the threshold the model came with (for a bundled model: cross-fitted
    on hospitals it never saw). Measured in docs/calibration.md: with 50 local cases it raised
    the share of draws keeping 95% sensitivity from 0.63 to 1.00 at BrEaST and from 0.56 to 1.00
    at BUS-BRA, and left BUSI at 0.60."""
    if fitted.sensitivity_promise.kept or prior.calibration is None:
        return fitted
    floor = transfer_threshold(prior.threshold, prior.temperature, fitted.temperature)
    if floor >= fitted.threshold:
        return fitted
    return fitted.replace(
        threshold=floor,
        operating_points={**fitted.operating_points, "target_sensitivity": floor},
        threshold_floor={"local": fitted.threshold, "model": floor,
                         "source": prior.calibration.source},
        sensitivity_promise=sensitivity_promise(labels, probabilities, floor,
                                                settings.target_sensitivity,
                                                settings.threshold_confidence),
    )  # fmt: skip


def calibrate_run(
    run_dir: str | Path,
    data: str | Path | Sequence[str | Path],
    split: str = "all",
    *,
    site: str | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    refit: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> CalibratedRun:
    """``busdx calibrate``: copy a run (or a bundled model) into ``out`` (default
    ``RUNDIR-<site>``; ``busdx-output/NAME-<site>`` for a bundled model) and refit its
    temperature and threshold (and, with ``refit``, its last layer) on a site's labelled cases.

    The original is never changed. ``overrides`` are ``evaluate.*`` settings such as
    ``evaluate.target_sensitivity=0.98`` or ``evaluate.threshold_confidence=0.9``. With the
    target-sensitivity policy, where the cases cannot show the target at that confidence the
    model's own threshold is kept as a floor (see :func:`_keep_floor`).
    """
    run_dir = resolve_run(run_dir)
    config, info = load_run(run_dir)
    dataset = samples_for_split(run_dir, config, info, data, split)
    site = site or dataset.site
    home = output_home(run_dir)
    out = Path(out) if out else home.with_name(f"{home.name}-{site}")
    create_run_dir(out, config.recipe)  # refuses an existing run directory
    config = apply_overrides(config, list(overrides))
    for name in (CONFIG_FILE, SPLIT_FILE, MODEL_FILE):
        if (run_dir / name).is_file():  # a bundled model has no split
            shutil.copyfile(run_dir / name, out / name)
    save_config(out, config)
    info["calibrated"] = {"from_run": str(run_dir.resolve()), "data": str(dataset.root),
                          "site": site, "split": dataset.split, "n": len(dataset.samples),
                          "head_refitted": refit}  # fmt: skip
    write_json(out / INFO_FILE, info)
    source = f"site {site}: {len(dataset.samples)} labelled cases"
    loaded = load_model(out, device=device)
    fitted = calibrate_model(
        out, loaded, dataset.samples, config.evaluate, source=source, refit=refit,
        progress=progress, prior=loaded.info,
    )  # fmt: skip
    return CalibratedRun(out, site, fitted)
