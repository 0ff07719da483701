import numpy as np
import pytest
from sklearn import metrics as skm

from busdx.errors import SingleClassError
from busdx.metrics import binary_metrics, roc_auc, roc_curve


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    y[:2] = [0, 1]
    score = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.25, 200), 0, 1), 2)  # with ties
    m = binary_metrics(y, score, threshold=0.5)
    pred = (score >= 0.5).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    fpr, tpr, _ = roc_curve(y, score)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2], threshold=0.5)
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == (0.5, 0.5, 0.5, 0.5)


def test_undefined_ratio_is_nan_not_zero():
    m = binary_metrics([0, 0, 1], [0.1, 0.2, 0.3], threshold=0.9)  # no positive calls
    assert np.isnan(m["ppv"]) and m["sensitivity"] == 0.0


def test_single_class_is_an_error_not_nan():
    with pytest.raises(SingleClassError, match="both benign and malignant"):
        binary_metrics([1, 1, 1], [0.2, 0.5, 0.9])
