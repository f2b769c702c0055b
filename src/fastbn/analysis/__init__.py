"""Analysis of batch norm: the reparameterisation view (Kohler et al.) and weight normalisation
(``reparam``, re-exported here), a small NumPy training stack (``nn``) and Santurkar et al.'s
loss-landscape measures (``landscape``).

Pure NumPy; nothing heavier is imported here (the scripts in ``analysis/`` import matplotlib,
scikit-learn and tqdm themselves).
"""
from . import landscape, nn, reparam, santurkar
from .reparam import *  # noqa: F403 - the public names are reparam.__all__

__all__ = ["landscape", "nn", "reparam", "santurkar", *reparam.__all__]
