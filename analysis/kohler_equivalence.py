#!/usr/bin/env python
"""Batch norm as a reparameterisation of the weights (Kohler et al.): check, tabulate, plot.

For z = X W followed by training-mode batch norm, BN(XW) = (X - mu) Ŵ + beta with
ŵ_j = gamma_j w_j / sqrt(w_jᵀ S w_j + eps), S the batch covariance; with S = I this is weight
normalisation. This script runs fastbn.analysis's five checks (forward, gradient, scale
invariance, weight norm on a whitened batch, Santurkar et al.'s Theorem 4.1) on

  (a) Gaussian batches with a random anisotropic, off-centre covariance, and
  (b) scikit-learn's bundled digits (8x8 images; the 3 constant pixels dropped, standardised),

for several (n, d, k), eps and both float64 and float32, plus negative controls that must fail.
It writes kohler_equivalence.md (tables) and kohler_equivalence.png (error against eps and
batch size; angles between gradient directions) to the output folder.

    python analysis/kohler_equivalence.py [OUT_DIR] [--quick] [--seed N]

Needs the ``analysis`` extra (matplotlib, scikit-learn; tqdm for a progress bar if present).
"""
import argparse
import os
import sys
import time

import numpy as np

from fastbn.analysis import (
    check_forward,
    check_gradient,
    check_projection,
    check_scale_invariance,
    check_weight_norm,
    column_angles,
    covariance,
    format_table,
    kohler_weights,
    run_checks,
    weight_norm_backward,
    whiten,
)

EPS_TABLE = (0.0, 1e-5)
DTYPES = (np.float64, np.float32)
CHECK_COLUMNS = ("forward", "gradient", "scale", "weight_norm", "projection")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Check numerically that batch norm is Kohler et al.'s reparameterisation "
                    "of the weights; write a Markdown table and a PNG figure.")
    parser.add_argument("out_dir", nargs="?", default=os.path.join("analysis-output", "kohler"),
                        help="folder to write kohler_equivalence.md/.png into (created if "
                             "missing; default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes only (seconds; used by the test suite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- data

def gaussian_batch(rng, n, d):
    """n rows of N(m, AᵀA) with a random rotation and spectrum over two decades."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = Q * np.logspace(-1, 1, d)
    return rng.standard_normal((n, d)) @ A.T + rng.standard_normal(d)


def digits_data():
    from sklearn.datasets import load_digits

    X = load_digits().data
    X = X[:, X.std(axis=0) > 0]  # 3 pixels are 0 in every image: no direction to normalise
    return (X - X.mean(axis=0)) / X.std(axis=0)


def digits_batch(rng, X, n):
    return X[rng.permutation(X.shape[0])[:n]]


def unit_params(rng, d, k):
    """W (d, k), gamma, beta and an upstream gradient generator's draw."""
    W = rng.standard_normal((d, k))
    gamma = rng.uniform(0.5, 2.0, k)
    beta = rng.standard_normal(k)
    return W, gamma, beta


# --------------------------------------------------------------------------- tables

def _fmt(x):
    return "—" if x is None else f"{x:.1e}"


def summary_rows(data_name, X, W, gamma, beta, dy, eps):
    """One Markdown row per dtype: the max relative difference of each check."""
    rows = []
    n, d = X.shape
    for dt in DTYPES:
        cols = dict.fromkeys(CHECK_COLUMNS)
        for r in run_checks(X, W, gamma, beta, eps, dy=dy, dtype=dt):
            if r.check in ("forward", "gradient") or eps == 0.0:
                cols[r.check] = r.max_rel
        rows.append((data_name, n, d, W.shape[1], eps, np.dtype(dt).name, cols))
    return rows


def main_table(rows):
    head = ("| data | n | d | k | eps | dtype | (1) BN(XW) = (X−μ)Ŵ+β | (2) ∇W, ∇γ | "
            "(3) scale invariance | (4) BN on whitened X = weight norm | (5) Thm 4.1 |")
    lines = [head, "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for data_name, n, d, k, eps, dt, cols in rows:
        cells = " | ".join(_fmt(cols[c]) for c in CHECK_COLUMNS)
        lines.append(f"| {data_name} | {n} | {d} | {k} | {eps:g} | {dt} | {cells} |")
    return "\n".join(lines)


def negative_controls(batches):
    """Each control breaks one hypothesis of an identity; the difference must become large."""
    rows = []
    for b in batches:
        # an eps comparable to the units' batch variance: eps/var is what the identities lose
        b.big_eps = float(np.median(np.var(b.X @ b.W, axis=0)))
    for label, fn in [
        ("(1) S from another batch of the same data",
         lambda b: check_forward(b.X, b.W, b.gamma, b.beta, 1e-5, S=covariance(b.X2))),
        ("(2) S from another batch of the same data",
         lambda b: check_gradient(b.X, b.W, b.gamma, b.beta, 1e-5, dy=b.dy,
                                  S=covariance(b.X2))),
        ("(1) S = I: weight norm in place of BN on X",
         lambda b: check_forward(b.X, b.W, b.gamma, b.beta, 1e-5, S=np.eye(b.X.shape[1]))),
        ("(1) Kohler eps = median var(XW), BN eps = 1e-5",
         lambda b: check_forward(b.X, b.W, b.gamma, b.beta, 1e-5, kohler_eps=b.big_eps)),
        ("(2) Kohler eps = median var(XW), BN eps = 1e-5",
         lambda b: check_gradient(b.X, b.W, b.gamma, b.beta, 1e-5, dy=b.dy,
                                  kohler_eps=b.big_eps)),
        ("(1) S × (1 + 1e-8): the check's resolution",
         lambda b: check_forward(b.X, b.W, b.gamma, b.beta, 1e-5,
                                 S=covariance(b.X) * (1 + 1e-8))),
        ("(3) scale invariance at eps = median var(XW)",
         lambda b: check_scale_invariance(b.X, b.W, b.gamma, b.beta, b.big_eps, dy=b.dy)),
        ("(4) X not whitened",
         lambda b: check_weight_norm(b.X, b.W, b.gamma, b.beta, 0.0, dy=b.dy,
                                     whiten_batch=False)),
        ("(5) Thm 4.1 at eps = median var(XW)",
         lambda b: check_projection(b.X, b.W, b.gamma, b.beta, b.big_eps, dy=b.dy)),
    ]:
        rows.append((label, [fn(b).max_rel for b in batches]))
    names = " | ".join(b.name for b in batches)
    lines = [f"| control (float64; must NOT agree) | {names} |",
             "|---|" + "---:|" * len(batches)]
    lines += [f"| {label} | " + " | ".join(f"{v:.1e}" for v in vals) + " |"
              for label, vals in rows]
    return "\n".join(lines), rows


class Batch:
    def __init__(self, name, X, X2, W, gamma, beta, dy):
        self.name, self.X, self.X2 = name, X, X2
        self.W, self.gamma, self.beta, self.dy = W, gamma, beta, dy


# --------------------------------------------------------------------------- figure data

def error_vs_eps(rng, n, d, k, eps_grid):
    X = gaussian_batch(rng, n, d)
    W, gamma, beta = unit_params(rng, d, k)
    dy = rng.standard_normal((n, k))
    curves = {name: [] for name in (
        "(1) forward, float64", "(1) forward, float32", "(2) ∇W, float64", "(2) ∇W, float32",
        "(1) forward, Kohler without eps", "(3) scale invariance", "(4) weight norm (whitened X)",
        "(5) Thm 4.1")}
    for eps in eps_grid:
        for dt, tag in ((np.float64, "float64"), (np.float32, "float32")):
            curves[f"(1) forward, {tag}"].append(
                check_forward(X, W, gamma, beta, eps, dtype=dt).max_rel)
            curves[f"(2) ∇W, {tag}"].append(
                check_gradient(X, W, gamma, beta, eps, dy=dy, dtype=dt).max_rel)
        curves["(1) forward, Kohler without eps"].append(
            check_forward(X, W, gamma, beta, eps, kohler_eps=0.0).max_rel)
        curves["(3) scale invariance"].append(
            check_scale_invariance(X, W, gamma, beta, eps, dy=dy).max_rel)
        curves["(4) weight norm (whitened X)"].append(
            check_weight_norm(X, W, gamma, beta, eps, dy=dy).max_rel)
        curves["(5) Thm 4.1"].append(check_projection(X, W, gamma, beta, eps, dy=dy).max_rel)
    return curves


def error_vs_batch(rng, d, k, n_grid, digits, n_digits):
    curves = {}
    W, gamma, beta = unit_params(rng, d, k)
    for n in n_grid:
        X = gaussian_batch(rng, n, d)
        dy = rng.standard_normal((n, k))
        for dt, tag in ((np.float64, "float64"), (np.float32, "float32")):
            curves.setdefault(f"Gaussian (1) forward, {tag}", []).append(
                check_forward(X, W, gamma, beta, 1e-5, dtype=dt).max_rel)
            curves.setdefault(f"Gaussian (2) ∇W, {tag}", []).append(
                check_gradient(X, W, gamma, beta, 1e-5, dy=dy, dtype=dt).max_rel)
    Wd, gd, bd = unit_params(rng, digits.shape[1], k)
    for n in n_digits:
        X = digits_batch(rng, digits, n)
        dy = rng.standard_normal((n, k))
        for dt, tag in ((np.float64, "float64"), (np.float32, "float32")):
            curves.setdefault(f"digits (2) ∇W, {tag}", []).append(
                check_gradient(X, Wd, gd, bd, 1e-5, dy=dy, dtype=dt).max_rel)
    return curves


def gradient_angles(batches):
    """Per unit: angle between BN's dL/dW and (a) weight norm's, (b) a plain linear layer's.

    BN's gradient is Kohler's projection in the S geometry, (I - S w wᵀ/‖w‖_S²) u; weight
    normalisation's is the Euclidean one, (I - w wᵀ/‖w‖²) u; a plain layer's is u itself,
    u = (X - mu)ᵀ dy. All three coincide in direction only when S ∝ I.
    """
    out = {}
    for b in batches:
        S = covariance(b.X)
        Xc = b.X - b.X.mean(axis=0)
        u = Xc.T @ b.dy
        g_bn = check_gradient_parts(b, S)
        g_wn, _ = weight_norm_backward(u, b.W, b.gamma, dim=1)
        out[f"{b.name}\nBN vs weight norm"] = column_angles(g_bn, g_wn)
        out[f"{b.name}\nBN vs plain"] = column_angles(g_bn, u)
    return out


def check_gradient_parts(b, S):
    """BN's dL/dW through fastbn's kernels (what check_gradient compares)."""
    import fastbn

    Z = b.X @ b.W
    _, mean, invstd = fastbn.batch_norm_forward(Z, b.gamma, b.beta, eps=0.0)
    dZ, _, _ = fastbn.batch_norm_backward(b.dy, Z, mean, invstd, b.gamma)
    return b.X.T @ dZ


def _style(name, palette):
    """Colour by what is compared, dashed for float32."""
    key = name.replace(", float32", "").replace(", float64", "")
    color = palette.setdefault(key, f"C{len(palette) % 10}")
    return color, ("--" if "float32" in name else "-")


def plot(path, eps_grid, eps_curves, n_grid, n_digits, n_curves, angles, n_info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-18  # exact zeros cannot go on a log axis
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.6), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    ax = axes[0]
    palette = {}
    for name, vals in eps_curves.items():
        color, ls = _style(name, palette)
        ax.loglog(eps_grid, np.maximum(vals, floor), ls, color=color, marker="o", ms=3,
                  label=name)
    ax.set_xlabel("eps")
    ax.set_ylabel("max relative difference")
    ax.set_title(f"Error against eps (Gaussian, n={n_info[0]}, d={n_info[1]}, k={n_info[2]})\n"
                 "Kohler with the same eps: rounding; identities exact at eps=0: ~eps/var",
                 fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="major", alpha=0.3)

    ax = axes[1]
    palette = {}
    for name, vals in n_curves.items():
        grid = n_digits if name.startswith("digits") else n_grid
        color, ls = _style(name, palette)
        ax.loglog(grid, np.maximum(vals, floor), ls, color=color, marker="o", ms=3, label=name)
    ax.axvline(n_info[1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"batch size n (dotted: n = d = {n_info[1]} for the Gaussian rows)")
    ax.set_ylabel("max relative difference")
    ax.set_title("Error against batch size (eps = 1e-5)\nsolid float64, dashed float32",
                 fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="major", alpha=0.3)

    ax = axes[2]
    labels = list(angles)[::-1]
    data = [angles[lab] for lab in labels]
    try:
        ax.boxplot(data, orientation="horizontal")  # matplotlib >= 3.10
    except TypeError:
        ax.boxplot(data, vert=False)
    ax.set_yticks(range(1, len(labels) + 1), [lab.replace("\n", "\n  ") for lab in labels],
                  fontsize=7)
    ax.set_xlabel("angle between gradient directions, per unit (degrees)")
    ax.set_title("dL/dW: BN (Kohler, S = cov X) vs weight norm (S = I)\n"
                 "and vs a plain linear layer", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        sys.exit(f"kohler_equivalence.py needs matplotlib and scikit-learn "
                 f"(pip install 'fastbn[analysis]'): {exc}")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    digits = digits_data()
    dd = digits.shape[1]
    if args.quick:
        g_shapes = [(8, 12, 3), (40, 6, 4)]
        d_shapes = [(16, 4), (128, 4)]
        eps_grid = np.logspace(-10, -1, 4)
        n_grid, n_digits = [4, 16, 64], [16, 128]
        fig_dims = (64, 8, 4)
    else:
        g_shapes = [(16, 64, 8), (64, 16, 8), (256, 64, 32), (1024, 128, 64), (4096, 256, 128)]
        d_shapes = [(32, 32), (256, 32), (1797, 32)]
        eps_grid = np.logspace(-12, 0, 13)
        n_grid = [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
        n_digits = [8, 16, 32, 64, 128, 256, 512, 1024, 1797]
        fig_dims = (256, 32, 16)

    tasks = [("Gaussian", n, d, k) for n, d, k in g_shapes]
    tasks += [("digits", n, dd, k) for n, k in d_shapes]
    rows, w_angle = [], 0.0
    for name, n, d, k in _progress(tasks, "checks"):
        X = gaussian_batch(rng, n, d) if name == "Gaussian" else digits_batch(rng, digits, n)
        W, gamma, beta = unit_params(rng, d, k)
        dy = rng.standard_normal((n, k))
        for eps in EPS_TABLE:
            rows += summary_rows(name, X, W, gamma, beta, dy, eps)
            W_hat = kohler_weights(W, covariance(X), gamma, eps)
            w_angle = max(w_angle, float(np.max(column_angles(W, W_hat))))

    nc, kc = (64, 8) if args.quick else (256, 32)
    batches = []
    for name in ("Gaussian", "digits"):
        if name == "Gaussian":
            Xall = gaussian_batch(rng, 2 * nc, 16 if args.quick else 64)
            X, X2 = Xall[:nc], Xall[nc:]
        else:
            perm = rng.permutation(digits.shape[0])
            X, X2 = digits[perm[:nc]], digits[perm[nc:2 * nc]]
        W, gamma, beta = unit_params(rng, X.shape[1], kc)
        batches.append(Batch(f"{name} (n={nc}, d={X.shape[1]}, k={kc})", X, X2, W, gamma, beta,
                             rng.standard_normal((nc, kc))))
    nc_table, nc_rows = negative_controls(batches)

    detail = batches[0]
    detail_results = []
    for dt in DTYPES:
        detail_results += run_checks(detail.X, detail.W, detail.gamma, detail.beta, 1e-5,
                                     dy=detail.dy, dtype=dt)

    eps_curves = error_vs_eps(rng, *fig_dims, eps_grid)
    n_curves = error_vs_batch(rng, fig_dims[1], fig_dims[2], n_grid, digits, n_digits)
    white = Batch("whitened Gaussian", whiten(batches[0].X), None, batches[0].W,
                  batches[0].gamma, batches[0].beta, batches[0].dy)
    angles = gradient_angles([batches[0], batches[1], white])

    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, "kohler_equivalence.png")
    md = os.path.join(args.out_dir, "kohler_equivalence.md")
    plot(png, eps_grid, eps_curves, n_grid, n_digits, n_curves, angles, fig_dims)

    f64 = [r for r in rows if r[5] == "float64"]
    worst64 = max(v for r in f64 for v in r[6].values() if v is not None)
    worst32 = max(v for r in rows if r[5] == "float32" for v in r[6].values() if v is not None)
    weakest_control = min(v for label, vals in nc_rows if "resolution" not in label
                          for v in vals)
    angle_lines = "\n".join(
        f"| {lab.replace(chr(10), ': ')} | {np.median(a):.2f} | {np.max(a):.2f} |"
        for lab, a in angles.items())
    command = "analysis/kohler_equivalence.py" + (" --quick" if args.quick else "") + \
        f" --seed {args.seed}"
    text = f"""# Batch norm as a reparameterisation of the weights: numerical check

Generated by `{command}` in {time.perf_counter() - t0:.1f} s; numpy {np.__version__}.

BN(XW) computed by fastbn's kernels on z = X W (and its backward chained through X W) against
the Kohler form (X − μ)Ŵ + β, ŵ_j = γ_j w_j / sqrt(w_jᵀ S w_j + eps), S = covariance(X), written
from the formulas in NumPy. Each cell is the largest relative difference over all the
quantities of that check: max |a − b| divided by max |b| or, where larger, by the size of the
terms summed to make b (dL/dW cancels to 0 by construction when d = 1 or n = 2, and Xᵀ dL/dz
sums uncentred values), and cosines for the orthogonality identities. Checks (3)–(5) are
identities at eps = 0 and are run there only (their deviation for eps > 0 is in the figure).
(4) needs a batch that can be whitened: n > d and full column rank, which digits batches
smaller than the whole set are not (some rare pixels are collinear within a batch).
dL/dy is a standard-normal draw; W ~ N(0, 1), γ ~ U(0.5, 2).

Data: *Gaussian* rows are N(m, AᵀA) with a random rotation and a spectrum over two decades
(condition number 10⁴ for S) and a random mean; *digits* is scikit-learn's bundled 8×8 digits
with its 3 constant pixels dropped, standardised over the whole set, batches drawn at random.

Worst float64 difference in the table: {worst64:.1e}; worst float32: {worst32:.1e}.

{main_table(rows)}

## Negative controls

The same checks with one hypothesis broken. Apart from the resolution row (S perturbed by 1e-8,
which must show up near 1e-8, far above float64 rounding), the smallest difference here is
{weakest_control:.1e}: a check cannot pass vacuously.

{nc_table}

## Angles

ŵ_j is a positive multiple of w_j by construction: the largest angle between a column of W and
the same column of Ŵ over all the table's problems is {w_angle:.1e}°. The directions that
differ are the gradients': BN projects u = (X − μ)ᵀ dy off S w in the S geometry, weight
normalisation off w in the Euclidean one, a plain layer not at all (per unit, degrees):

| pair | median | max |
|---|---:|---:|
{angle_lines}

## All quantities for one problem ({detail.name}, eps = 1e-5 for (1)–(2), 0 for (3)–(5))

{format_table(detail_results)}

Figure: `kohler_equivalence.png` (left: error against eps: Kohler with the same eps stays at
rounding, the identities that hold only at eps = 0 grow like eps/var; middle: error against
batch size; right: angles between gradient directions).
"""
    with open(md, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {md}")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
