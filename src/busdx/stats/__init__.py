"""Statistics: metrics with bootstrap CIs (``metrics``), temperature scaling and thresholds
(``calibration``), agreement (``agreement``), BI-RADS likelihood categories (``likelihood``).
"""
