#!/usr/bin/env python
"""Santurkar et al. (2018), Sec. 3 / Fig. 4: does batch norm make the loss landscape smoother?

Trains a ReLU perceptron on MNIST-1D (--model mlp) or a 25-layer deep linear network on
Gaussian classes (--model linear, Santurkar et al. Fig. 5) with and without fastbn BatchNorm
(same initial weights, same batches) with plain SGD at two learning rates, and every few steps, at
the current weights W_t and batch, with g = grad L(W_t) and step sizes eta' in
[lr/4, 4 lr] (9 points, geometric), measures:

  * loss variation: L(W_t - eta' g), drawn as the band min..max over eta';
  * gradient predictiveness: ||g - grad L(W_t - eta' g)||_2, band min..max over eta';
  * effective beta-smoothness: max over eta' of ||g - grad L(W_t - eta' g)||_2 / ||eta' g||_2.

With plain SGD, eta' = lr is exactly the step training takes, so the range brackets it.

It also takes the largest Hessian eigenvalue (power iteration on finite-difference
Hessian-vector products) every few probes and the relative ICS ||G - G'|| / ||G||.

Writes to the output folder: landscape.png (rows: the measures; columns: the learning rates;
bands over eta' and all seeds, a dashed line at eta' = lr; --linear-axes for linear y axes),
summary.md (tables over all seeds) and results.json.

    python analysis/landscape.py [OUT_DIR] [--quick] [--seed N] [--threads N]

--quick runs a small configuration in seconds (used by the tests); the default (full) mode takes
about a minute on 2 cores. Needs the ``analysis`` extra: matplotlib, scikit-learn, tqdm.
"""
import json
import os
import platform
import sys
import time

import numpy as np

import _script  # analysis/_script.py, beside this script (sys.path[0] when run as a script)
from fastbn.analysis import landscape, nn

KINDS = ("standard", "bn")
LABELS = {"standard": "standard", "bn": "BN"}
COLORS = {"standard": "tab:blue", "bn": "tab:orange"}
# A run whose batch loss exceeds this has diverged (the loss at initialisation is ~2.3): it is
# stopped there and reported as such.
DIVERGED_LOSS = 1e4
ETA_FACTORS = 2.0 ** np.linspace(-2, 2, 9)  # eta' / lr

CONFIGS = {
    "mlp": {
        "quick": dict(depth=4, hidden=32, epochs=2, seeds=2, batch_size=64, lrs=(0.05, 0.25),
                      probe_every=4, early_steps=20, hessian_every=5, activation="relu"),
        "full": dict(depth=10, hidden=64, epochs=5, seeds=3, batch_size=64, lrs=(0.05, 0.25),
                     probe_every=6, early_steps=108, hessian_every=6, activation="relu"),
    },
    # Santurkar et al. Fig. 5 (and their appendix's landscape plots): a 25-layer deep linear
    # network, here on synthetic Gaussian classes (fastbn.analysis.santurkar.gaussian_classes)
    "linear": {
        "quick": dict(depth=6, hidden=8, epochs=2, seeds=2, batch_size=64, lrs=(0.02, 0.1),
                      probe_every=4, early_steps=20, hessian_every=5, activation=None),
        "full": dict(depth=25, hidden=16, epochs=8, seeds=3, batch_size=64, lrs=(0.02, 0.1),
                     probe_every=4, early_steps=100, hessian_every=6, activation=None),
    },
}
HESSIAN_ITERS = 15


def parse_args(argv=None):
    import argparse

    # this script's own options first; the rest are the shared ones of _script.py
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--model", choices=("mlp", "linear"), default="mlp",
                     help="mlp: 10-layer ReLU MLP on MNIST-1D; linear: 25-layer deep linear "
                          "network on Gaussian classes (default: %(default)s)")
    own.add_argument("--linear-axes", action="store_true", help="linear y axes (default: log)")
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = _script.parse_args(
        rest, name="landscape",
        description="Loss variation, gradient predictiveness and effective beta-smoothness "
                    "along training, standard vs BN, at two learning rates (Santurkar et al.); "
                    "options --model {mlp,linear} and --linear-axes too.",
        threads_help="BLAS and fastbn threads")
    args.model, args.linear_axes = mine.model, mine.linear_axes
    return args


limit_threads = _script.limit_threads


# --------------------------------------------------------------------------- training

def train(kind, lr, seed, cfg, data, progress):
    """One run with probes; returns a dict of lists (JSON-serialisable)."""
    x_tr, y_tr, x_te, y_te = data
    net = nn.mlp(x_tr.shape[1], cfg["hidden"], 10, cfg["depth"], batch_norm=kind == "bn",
                 seed=seed, activation=cfg["activation"])
    opt = nn.SGD(net.parameters(), lr)
    order = np.random.default_rng([seed, 1])  # same batches for both networks of a seed
    etas = lr * ETA_FACTORS
    rec = {"lr": lr, "etas": etas.tolist(), "step": [], "loss": [], "probe_step": [],
           "probe_loss": [], "grad_norm": [], "losses": [], "grad_diffs": [], "beta": [],
           "beta_argmax": [], "hess_step": [], "hess": [], "ics_rel": [], "diverged_at": None}
    n_probe = 0
    step = 0
    for _ in range(cfg["epochs"]):
        for idx in nn.minibatches(len(x_tr), cfg["batch_size"], order):
            xb, yb = x_tr[idx], y_tr[idx]
            if step % cfg["probe_every"] == 0:
                with np.errstate(over="ignore", invalid="ignore"):
                    p = landscape.probe_landscape(net, xb, yb, etas)
                rec["probe_step"].append(step)
                rec["probe_loss"].append(p.loss)
                rec["grad_norm"].append(p.grad_norm)
                rec["losses"].append(p.losses.tolist())
                rec["grad_diffs"].append(p.grad_diffs.tolist())
                rec["beta"].append(p.beta_smoothness)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = p.grad_diffs / (p.etas * p.grad_norm)
                rec["beta_argmax"].append(int(np.nanargmax(ratio)) if np.any(np.isfinite(ratio))
                                          else -1)
                if n_probe % cfg["hessian_every"] == 0:
                    with np.errstate(all="ignore"):
                        lam, _ = landscape.top_hessian_eigenvalue(net, xb, yb,
                                                                  iters=HESSIAN_ITERS, seed=step)
                    rec["hess_step"].append(step)
                    rec["hess"].append(lam)
                n_probe += 1
            with np.errstate(over="ignore", invalid="ignore"):
                loss, _ = nn.loss_and_gradient(net, xb, yb)
            if not np.isfinite(loss) or loss > DIVERGED_LOSS:
                rec["diverged_at"] = step
                return rec
            rec["step"].append(step)
            rec["loss"].append(loss)
            if (step // cfg["probe_every"]) % 2 == 0 and step % cfg["probe_every"] == 0:
                with np.errstate(all="ignore"):
                    ics = landscape.internal_covariate_shift(net, xb, yb,
                                                             opt.peek(net.gradients()))
                rel = ics.l2 / np.where(ics.grad_norm > 0, ics.grad_norm, np.nan)
                rec["ics_rel"].append([step, float(np.nanmedian(rel[1:])), float(rel[-1])])
            opt.step(net.gradients())
            step += 1
            progress.update(1)
    rec["test_acc"] = nn.evaluate(net, x_te, y_te)[1]
    return rec


# --------------------------------------------------------------------------- figure

def _finite(x, *ys):
    x = np.asarray(x, dtype=np.float64)
    ys = [np.asarray(y, dtype=np.float64) for y in ys]
    ok = np.isfinite(x)
    for y in ys:
        ok &= np.isfinite(y) & (y > 0)
    return (x[ok],) + tuple(y[ok] for y in ys)


def _aligned(runs, key_x, key_y):
    """(x, array seeds x points) over the points every run reached (diverged runs stop)."""
    n = min(len(r[key_y]) for r in runs)
    if n == 0:
        return None, None
    return (np.asarray(runs[0][key_x][:n], dtype=np.float64),
            np.array([np.asarray(r[key_y][:n], dtype=np.float64) for r in runs]))


def plot(results, cfg, path, linear_axes=False):
    """Rows: loss variation, gradient predictiveness, beta (with the top Hessian eigenvalue),
    relative ICS; columns: learning rates. Bands span all seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = cfg["lrs"]
    k_lr = int(np.argmin(np.abs(ETA_FACTORS - 1)))  # the column eta' = lr
    fig, axes = plt.subplots(4, len(lrs), figsize=(6.5 * len(lrs), 14), squeeze=False)
    for col, lr in enumerate(lrs):
        for kind in KINDS:
            runs = results[(kind, lr)]
            c, label = COLORS[kind], LABELS[kind]
            div = [r["diverged_at"] for r in runs if r["diverged_at"] is not None]
            if div:
                label += f" ({len(div)}/{len(runs)} diverged)"
            for row, key in ((0, "losses"), (1, "grad_diffs")):
                x, v = _aligned(runs, "probe_step", key)
                if x is None:
                    continue
                v = v.reshape(len(runs), len(x), len(ETA_FACTORS))
                with np.errstate(invalid="ignore"):
                    lo, hi = np.nanmin(v, axis=(0, 2)), np.nanmax(v, axis=(0, 2))
                    at_lr = np.nanmedian(v[:, :, k_lr], axis=0)
                ok = np.isfinite(lo) & np.isfinite(hi)
                axes[row, col].fill_between(x[ok], lo[ok], hi[ok], color=c, alpha=0.35, lw=0,
                                            label=f"{label}: range over η′ and seeds")
                axes[row, col].plot(x, at_lr, color=c, lw=0.9, ls="--",
                                    label=f"{label}: at η′ = lr (median of seeds)")
            x, b = _aligned(runs, "probe_step", "beta")
            if x is not None:
                with np.errstate(invalid="ignore"):
                    axes[2, col].fill_between(x, np.nanmin(b, 0), np.nanmax(b, 0), color=c,
                                              alpha=0.3, lw=0)
                    axes[2, col].plot(x, np.nanmedian(b, 0), color=c, lw=1.2,
                                      label=f"{label}: effective β (median, band = seeds)")
            x, h = _aligned(runs, "hess_step", "hess")
            if x is not None:
                axes[2, col].plot(x, np.nanmedian(np.abs(h), 0), color=c, lw=1.2, ls=":",
                                  marker=".", label=f"{label}: |top Hessian eigenvalue|")
            ics = [dict(step=[v[0] for v in r["ics_rel"]], rel=[v[1] for v in r["ics_rel"]])
                   for r in runs]
            x, v = _aligned(ics, "step", "rel")
            if x is not None:
                with np.errstate(invalid="ignore"):
                    axes[3, col].fill_between(x, np.nanmin(v, 0), np.nanmax(v, 0), color=c,
                                              alpha=0.3, lw=0)
                    axes[3, col].plot(x, np.nanmedian(v, 0), color=c, lw=1.2, label=label)
        axes[0, col].set_title(f"lr {lr}: loss landscape L(W − η′g), η′ in [lr/4, 4 lr]")
        axes[1, col].set_title(f"lr {lr}: gradient predictiveness ‖g − ∇L(W − η′g)‖")
        axes[2, col].set_title(f"lr {lr}: effective β-smoothness and Hessian λ_max")
        axes[3, col].set_title(f"lr {lr}: relative ICS, median over layers 2..L")
        axes[0, col].set_ylabel("training loss (nats)")
        axes[1, col].set_ylabel("‖g − g′‖₂ (gradient norm units)")
        axes[2, col].set_ylabel("β: ‖Δg‖ / ‖Δw‖ (loss / weight²)")
        axes[3, col].set_ylabel("‖G − G′‖ / ‖G‖ (ratio)")
        for ax in axes[:, col]:
            if not linear_axes:
                ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{cfg['data']}, {cfg['depth']}-layer {'ReLU MLP' if cfg['activation'] else 'deep linear net'} "
                 f"(width {cfg['hidden']}), plain SGD, batch {cfg['batch_size']}; probe every "
                 f"{cfg['probe_every']} steps; {cfg['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- summary

def _stat(values):
    """'mean (min..max)' over seeds; '—' when no seed gives a value."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return "—"
    if v.size == 1:
        return f"{v[0]:.3g}"
    return f"{v.mean():.3g} ({v.min():.3g}..{v.max():.3g})"


def probe_medians(run, lo, hi):
    """Medians, over the probes with lo <= step < hi, of the band widths and beta."""
    steps = np.asarray(run["probe_step"])
    keep = (steps >= lo) & (steps < hi)
    if not keep.any():
        return None
    losses = np.array(run["losses"]).reshape(-1, len(ETA_FACTORS))[keep]
    diffs = np.array(run["grad_diffs"]).reshape(-1, len(ETA_FACTORS))[keep]
    with np.errstate(invalid="ignore"):
        return {
            "loss_range": float(np.nanmedian(losses.max(axis=1) - losses.min(axis=1))),
            "grad_diff_max": float(np.nanmedian(diffs.max(axis=1))),
            "beta": float(np.nanmedian(np.asarray(run["beta"])[keep])),
            "grad_norm": float(np.nanmedian(np.asarray(run["grad_norm"])[keep])),
        }


def _argmin_share(results, cfg):
    idx = [i for runs in results.values() for r in runs for i in r["beta_argmax"]]
    return f"{sum(i == 0 for i in idx)}/{len(idx)}"


def landscape_table(results, cfg, lo, hi):
    lines = ["| lr | network | loss range max−min over η′ | max over η′ of ‖g − g′‖ | "
             "effective β-smoothness | ‖g‖ |",
             "|---:|---|---:|---:|---:|---:|"]
    for lr in cfg["lrs"]:
        for kind in KINDS:
            meds = [probe_medians(r, lo, hi) for r in results[(kind, lr)]]
            meds = [m for m in meds if m is not None]
            cells = [_stat([m[k] for m in meds]) for k in
                     ("loss_range", "grad_diff_max", "beta", "grad_norm")]
            lines.append(f"| {lr} | {LABELS[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(results, cfg, spe):
    lines = ["| lr | network | diverged | final train loss (last epoch, batches) | "
             "test accuracy |", "|---:|---|---:|---:|---:|"]
    for lr in cfg["lrs"]:
        for kind in KINDS:
            runs = results[(kind, lr)]
            ok = [r for r in runs if r["diverged_at"] is None]
            div = f"{len(runs) - len(ok)}/{len(runs)}"
            if any(r["diverged_at"] is not None for r in runs):
                div += " (at step " + ", ".join(str(r["diverged_at"]) for r in runs
                                                if r["diverged_at"] is not None) + ")"
            lines.append(f"| {lr} | {LABELS[kind]} | {div} | "
                         f"{_stat([np.mean(r['loss'][-spe:]) for r in ok])} | "
                         f"{_stat([r['test_acc'] for r in ok])} |")
    return "\n".join(lines)


def write_summary(path, results, cfg, mode, spe, wall, fig_name):
    import fastbn

    total = cfg["epochs"] * spe
    early = cfg["early_steps"]
    text = f"""# Loss landscape with and without batch norm (Santurkar et al. 2018, Fig. 4)

Mode: **{mode}**. Data: {cfg['data']}, {cfg['n_train']} training samples. Network:
{cfg['depth']} Linear layers of width {cfg['hidden']}, {'ReLU' if cfg['activation'] else 'no activation (deep linear)'}; the BN network has fastbn `BatchNorm` after every hidden Linear. Same
initial weights and batches for both networks of a seed. Plain SGD (no momentum, so η′ = lr is
the step training takes), batch {cfg['batch_size']}, {cfg['epochs']} epochs ({total} steps),
seeds {cfg['seed0']}..{cfg['seed0'] + cfg['seeds'] - 1}, learning rates
{', '.join(str(lr) for lr in cfg['lrs'])}.

Every {cfg['probe_every']} steps, at W_t on the current batch with g = ∇L(W_t) (training-mode
BN; all parameters, γ and β included, move along −g), for 9 step sizes η′ = lr·2^k,
k = −2, −1.5, …, 2:
loss range = max − min of L(W_t − η′g); ‖g − g′‖ = ‖∇L(W_t) − ∇L(W_t − η′g)‖₂, its maximum over
η′; effective β-smoothness = max over η′ of ‖g − g′‖ / ‖η′g‖. Cells: the median over the probes
of one run, then mean (min..max) over seeds; runs that diverged count up to the divergence.
Figure: {fig_name} (bands over η′ and all seeds; dashed: η′ = lr; dotted: |top Hessian
eigenvalue| by {HESSIAN_ITERS} power iterations every {cfg['hessian_every']}th probe; bottom row: relative ICS).
The effective β is attained at the smallest η′ in {_argmin_share(results, cfg)} of the probes.

## Training

{training_table(results, cfg, spe)}

## Early training (steps 0–{early - 1})

{landscape_table(results, cfg, 0, early)}

## Whole run (steps 0–{total - 1})

{landscape_table(results, cfg, 0, total)}

Wall time: {wall:.1f} s (fastbn {fastbn.__version__}, {fastbn.get_num_threads()} thread(s),
numpy {np.__version__}, Python {platform.python_version()}).
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    cfg = dict(CONFIGS[args.model][mode], seed0=args.seed, model=args.model)
    os.makedirs(args.out_dir, exist_ok=True)
    keep = limit_threads(args.threads)  # noqa: F841 - the limit lasts while this lives
    from tqdm import tqdm

    start = time.perf_counter()
    from fastbn.analysis import santurkar

    if args.model == "mlp":
        *data, cfg["data"] = santurkar.load_hard_split()
    else:
        x, y = santurkar.gaussian_classes(2500, 20, 10, sep=1.0, seed=0)
        data = (x[:2000], y[:2000], x[2000:], y[2000:])
        cfg["data"] = "Gaussian classes (20-D, 10 classes)"
    cfg["n_train"] = len(data[0])
    spe = len(data[0]) // cfg["batch_size"]
    total = len(KINDS) * len(cfg["lrs"]) * cfg["seeds"] * cfg["epochs"] * spe
    results = {(k, lr): [] for lr in cfg["lrs"] for k in KINDS}
    with tqdm(total=total, desc=f"landscape ({mode})", unit="step",
              disable=args.no_progress, file=sys.stderr) as bar:
        for seed in range(args.seed, args.seed + cfg["seeds"]):
            for lr in cfg["lrs"]:
                for kind in KINDS:
                    bar.set_postfix(net=kind, lr=lr, seed=seed)
                    rec = train(kind, lr, seed, cfg, data, bar)
                    rec["seed"] = seed
                    if rec["diverged_at"] is not None:  # keep the bar's total honest
                        bar.update(cfg["epochs"] * spe - rec["diverged_at"])
                    results[(kind, lr)].append(rec)
    train_wall = time.perf_counter() - start
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": dict(cfg, lrs=list(cfg["lrs"])), "mode": mode,
                   "train_wall_s": train_wall, "eta_factors": ETA_FACTORS.tolist(),
                   "runs": {f"{k}@lr={lr}": v for (k, lr), v in results.items()}}, f)
    fig = "landscape.png"
    plot(results, cfg, os.path.join(args.out_dir, fig), args.linear_axes)
    wall = time.perf_counter() - start
    write_summary(os.path.join(args.out_dir, "summary.md"), results, cfg, mode, spe, wall, fig)
    print(f"wrote {fig}, summary.md, results.json to {args.out_dir} ({wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
