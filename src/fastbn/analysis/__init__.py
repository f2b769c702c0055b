"""Analysis of batch norm: the reparameterisation view (Kohler et al.) and weight normalisation
(``reparam``, re-exported here), a small NumPy training stack (``nn``) and Santurkar et al.'s
loss-landscape measures (``landscape``).

Pure NumPy; nothing heavier is imported here (the scripts in ``analysis/`` import matplotlib,
scikit-learn and tqdm themselves).
"""
from . import landscape, nn
from .reparam import (
    CheckResult,
    Comparison,
    check_forward,
    check_gradient,
    check_projection,
    check_scale_invariance,
    check_weight_norm,
    column_angles,
    covariance,
    format_table,
    kohler_weights,
    report_lines,
    run_checks,
    s_norm,
    weight_norm,
    weight_norm_backward,
    whiten,
)

__all__ = [
    "landscape",
    "nn",
    "CheckResult",
    "Comparison",
    "check_forward",
    "check_gradient",
    "check_projection",
    "check_scale_invariance",
    "check_weight_norm",
    "column_angles",
    "covariance",
    "format_table",
    "kohler_weights",
    "report_lines",
    "run_checks",
    "s_norm",
    "weight_norm",
    "weight_norm_backward",
    "whiten",
]
