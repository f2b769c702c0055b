"""Which array module an argument belongs to, without importing CuPy.

fastbn never imports CuPy at ``import fastbn``; a CuPy array is recognised by its type's module,
so this works (and is cheap) on machines without CuPy.
"""
import numpy as np


def is_cupy_array(a):
    return type(a).__module__.split(".", 1)[0] == "cupy"


def get_array_module(*arrays):
    """``cupy`` if any argument is a CuPy array, else ``numpy`` (None arguments are ignored).

    Raises TypeError when NumPy and CuPy arrays are mixed, naming the position of the first
    argument that disagrees.
    """
    module = None
    for i, a in enumerate(arrays):
        if a is None or not hasattr(a, "shape"):
            continue
        gpu = is_cupy_array(a)
        if module is None:
            module = gpu
        elif module != gpu:
            kinds = ("a NumPy array", "a CuPy array")
            raise TypeError(
                f"argument {i}: expected {kinds[module]} like the first array argument, got "
                f"{kinds[gpu]} (move every array to one device first)"
            )
    if module:
        import cupy

        return cupy
    return np
