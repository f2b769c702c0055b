"""Command-line scaffolding shared by the analysis scripts (noisy_bn.py, landscape.py)."""
import argparse
import os


def parse_args(argv, *, name, description, threads_help="BLAS and fastbn threads"):
    """The scripts' common options: OUT_DIR (or --out), --quick, --seed, --threads, --no-progress."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out_dir", nargs="?", default=os.path.join("analysis-output", name),
                        help="folder for the figures and summary (default: %(default)s)")
    parser.add_argument("--out", dest="out_opt", default=None,
                        help="same as OUT_DIR (overrides it)")
    parser.add_argument("--quick", action="store_true",
                        help="small network, few steps (seconds; used by the tests)")
    parser.add_argument("--seed", type=int, default=0,
                        help="first seed; runs use seed, seed+1, ... (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help=f"{threads_help} (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.out_opt:
        args.out_dir = args.out_opt
    if args.threads < 1:
        parser.error(f"--threads: expected an int >= 1, got {args.threads}")
    return args


def limit_threads(n):
    """Pin BLAS (threadpoolctl, if installed) and fastbn to n threads; returns a keep-alive."""
    import fastbn

    fastbn.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(n)
