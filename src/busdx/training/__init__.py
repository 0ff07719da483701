"""Training: the loop (``loop``), ``optimization``, ``losses``, augmentation (``transforms``),
data ``loading``, the frozen-feature cache (``feature_cache``) and fitting the out-of-scope
guard (``scope_fit``).
"""
