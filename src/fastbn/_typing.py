"""Type aliases of the public API (used in annotations only; nothing here runs at import).

Arrays in are anything NumPy (or CuPy, for the GPU path) reads; arrays out are NumPy arrays for
CPU input, typed here as such (CuPy input gives CuPy arrays of the same shapes).
"""
from typing import Any, Literal, Optional

import numpy as np
import numpy.typing as npt

ArrayLike = npt.ArrayLike
Array = npt.NDArray[Any]
F64Array = npt.NDArray[np.float64]
Activation = Optional[Literal["relu"]]
