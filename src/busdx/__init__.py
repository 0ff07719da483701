"""busdx: benign vs malignant breast-ultrasound classification with honest evaluation."""

__version__ = "0.3.0"
