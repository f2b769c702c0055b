"""airspeed velocity benchmarks of fastbn (see asv.conf.json at the repository root).

Importing fastbn is checked here, once, so that a benchmark run that cannot load fastbn says
what to do. With ``ASV_PYTHONPATH=$PWD/src asv run --python=same`` the checkout's ``src/``
comes first on the path, so its fastbn shadows any installed copy: there the kernels must be
built in place (``python setup.py build_ext --inplace``); ``pip install .`` would not help.
"""
import importlib.util
import os

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _check_fastbn():
    try:
        import fastbn  # noqa: F401
    except ImportError as exc:
        spec = importlib.util.find_spec("fastbn")
        origin = os.path.abspath(spec.origin) if spec is not None and spec.origin else ""
        if origin.startswith(_SRC + os.sep):
            raise ImportError(
                f"fastbn is imported from this checkout's source tree ({os.path.dirname(origin)}, "
                "on the path through ASV_PYTHONPATH), where its compiled kernels are not built. "
                "Build them in place first: python -m pip install 'Cython>=3.1' "
                "'setuptools>=77' 'numpy>=2' && python setup.py build_ext --inplace "
                "(an installed fastbn cannot help: src/ shadows it). Or drop --python=same and "
                f"let asv build each commit in its own environment. ({exc.__cause__ or exc})"
            ) from exc
        raise


_check_fastbn()
