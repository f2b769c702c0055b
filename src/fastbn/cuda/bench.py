"""``python -m fastbn.cuda.bench``: the GPU benchmark, now ``python -m fastbn bench --gpu``.

A compatibility entry point: it runs :func:`fastbn.benchmark.main` with ``--gpu``. The
earlier space-separated ``--rows A B`` and ``--ops X Y`` are still accepted (joined with
commas, the syntax of ``python -m fastbn bench``).
"""
import sys


def _legacy_lists(argv):
    """``--rows a b --ops x y`` -> ``--rows a,b --ops x,y`` (other options unchanged)."""
    out = []
    i = 0
    while i < len(argv):
        a = argv[i]
        out.append(a)
        i += 1
        if a in ("--rows", "--ops"):
            items = []
            while i < len(argv) and not argv[i].startswith("-"):
                items.append(argv[i])
                i += 1
            if items:
                out.append(",".join(items))
            else:
                out.pop()  # a bare --rows or --ops meant "all", as the default
    return out


def main(argv=None):
    """The GPU benchmark; returns the exit code (2, with the reason, without CuPy)."""
    from ..benchmark import main as _main

    argv = sys.argv[1:] if argv is None else list(argv)
    return _main(["--gpu", *_legacy_lists([a for a in argv if a != "--gpu"])])


if __name__ == "__main__":
    sys.exit(main())
