"""Which array module an argument belongs to, without importing CuPy.

fastbn never imports CuPy at ``import fastbn``; a CuPy array is recognised by its type's module,
so this works (and is cheap) on machines without CuPy.
"""


def is_cupy_array(a):
    return type(a).__module__.split(".", 1)[0] == "cupy"
