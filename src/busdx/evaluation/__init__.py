"""Evaluation: a model on labelled images (``evaluate``), paired comparisons (``compare``), the
radiologists' BI-RADS (``radiologists``), a local result against the model card's range
(``local_check``), outlines against the readers' masks (``segmentation``).
"""
