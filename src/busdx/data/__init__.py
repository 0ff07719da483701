"""Data: dataset layouts, sites and splits (``datasets``), label tables (``tables``), decoding
images and DICOM (``imaging``, ``dicom``), lesion boxes (``boxes``), prediction inputs
(``inputs``), dataset audits (``audit``), synthetic scans (``synthetic``) and preprocessing in
NumPy/Pillow (``preprocess``).
"""
