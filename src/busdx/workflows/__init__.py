"""Workflows, one command's work each: train and evaluate (``pipeline``), cross-validation
(``crossval``) and cross-fitting (``crossfit``), calibration to a site (``calibrate``,
``head_refit``), BatchNorm adaptation (``adapt``), ``export``, the ``demo``, Ray (``cluster``).
"""
