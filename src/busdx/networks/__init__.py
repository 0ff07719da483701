"""The PyTorch networks: backbone registry and heads (``classifier``), mask ``decoders``,
pretrained ``weights``, the torch backend of a Predictor (``torch_engine``) and Grad-CAM
(``gradcam``).
"""
