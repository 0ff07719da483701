"""Reporting: ``figures`` (training curves, ROC, reliability, samples) and the ``model_card``
(the run report and MODEL_CARD.md)."""
