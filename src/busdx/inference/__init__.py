"""Inference without torch: what a model file carries (``model_file``), the ``predictor``, its
ONNX Runtime ``engines``, batch prediction (``batch``) and the out-of-scope checks (``scope``).
"""
