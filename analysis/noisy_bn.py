#!/usr/bin/env python
"""Santurkar et al. (2018), Sec. 2: does batch norm help by reducing internal covariate shift?

Trains four ReLU perceptrons with the same initial weights and the same batches on
MNIST-1D (or a hard make_classification problem without the mnist1d package; see
fastbn.analysis.santurkar.load_hard_split), at a learning rate where BN matters (lr_sweep.py):

  * standard: Linear -> ReLU blocks;
  * BN: Linear -> fastbn BatchNorm -> ReLU;
  * noisy BN: Linear -> BatchNorm -> a <- s*a + m -> ReLU, with a fresh draw every step and in
    every layer (mu_t ~ U(-0.5, 0.5), sigma_t ~ U(1, 1.25), m ~ U(mu_t ± 0.1), s ~ N(sigma_t, 0.1)),
    i.e. a deliberately *unstable* distribution of every layer's input; drawn i.i.d. for every
    activation of every sample (the paper's, default) and, as a labelled variant, once per unit
    and step (shared by the batch, "per step");

and measures, every few steps, the internal covariate shift of the standard and the BN network
per layer: G = grad_{W_i} L(W^t), G' = the same after layers 1..i-1 took this step's update (same
batch); ||G - G'||_2 and cos(G, G').

Writes to the output folder: training_curves.png (training loss, training accuracy, test
accuracy against the step; mean over seeds, band = min..max over seeds), ics.png (ICS against the
step for three layers: absolute, relative to ||G|| and cosine), activations.png (Fig. 2: the
15/50/85 % quantiles of one unit's pre-activation against the step), activation_drift.json,
summary.md (tables) and results.json (every number).

    python analysis/noisy_bn.py [OUT_DIR] [--quick] [--seed N] [--threads N]

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

KINDS = ("standard", "bn", "noisy_bn", "noisy_bn_step")
LABELS = {"standard": "standard", "bn": "BN", "noisy_bn": "noisy BN (per sample)",
          "noisy_bn_step": "noisy BN (per step)"}
COLORS = {"standard": "tab:blue", "bn": "tab:orange", "noisy_bn": "tab:green",
          "noisy_bn_step": "tab:olive"}
QUANTILES = (15, 50, 85)  # Fig. 2: percentiles of one unit's pre-activation over the batch
ICS_KINDS = ("standard", "bn")
# A run whose batch loss exceeds this has diverged (the loss at initialisation is ~2.3 = log 10;
# past this the logits are off by thousands and the weights keep growing): it is stopped there.
DIVERGED_LOSS = 1e4

CONFIGS = {
    "quick": dict(depth=4, hidden=32, epochs=2, seeds=1, batch_size=64, lr=0.1, momentum=0.9,
                  ics_every=4, early_steps=21),
    # lr 0.1: where BN trains clearly better than the standard net (see lr_sweep.py), so that
    # "noisy BN trains as well as BN" is a statement about something BN does
    "full": dict(depth=10, hidden=64, epochs=15, seeds=3, batch_size=64, lr=0.1, momentum=0.9,
                 ics_every=8, early_steps=104),
}


def parse_args(argv=None):
    return _script.parse_args(
        argv, name="noisy_bn",
        description="Training curves of standard, BN and noisy-BN perceptrons on MNIST-1D, and "
                    "the internal covariate shift of standard vs BN (Santurkar et al. 2018).",
        threads_help=("BLAS and fastbn threads; the matrices are small, more threads mostly add "
                      "overhead"))


limit_threads = _script.limit_threads


# --------------------------------------------------------------------------- training

def train(kind, seed, cfg, data, progress):
    """One run; returns a dict of lists (JSON-serialisable)."""
    x_tr, y_tr, x_te, y_te = data
    net = nn.mlp(x_tr.shape[1], cfg["hidden"], 10, cfg["depth"], batch_norm=kind != "standard",
                 noisy_bn=kind.startswith("noisy"),
                 noise="per_step" if kind == "noisy_bn_step" else "per_sample", seed=seed)
    taps = attach_taps(net, tap_blocks(cfg["depth"]))
    opt = nn.SGD(net.parameters(), cfg["lr"], momentum=cfg["momentum"])
    # the batch order depends on the seed only, so all networks see the same batches
    order = np.random.default_rng([seed, 1])
    rec = {"step": [], "loss": [], "acc": [], "eval_step": [], "test_loss": [], "test_acc": [],
           "ics_step": [], "ics_l2": [], "ics_cos": [], "ics_norm": [], "diverged_at": None,
           "act_q": []}

    def evaluate(step):
        loss, acc = nn.evaluate(net, x_te, y_te)
        rec["eval_step"].append(step)
        rec["test_loss"].append(loss)
        rec["test_acc"].append(acc)

    evaluate(0)
    step = 0
    for _ in range(cfg["epochs"]):
        for idx in nn.minibatches(len(x_tr), cfg["batch_size"], order):
            xb, yb = x_tr[idx], y_tr[idx]
            net.resample_noise()
            with np.errstate(over="ignore", invalid="ignore"):
                loss, logits = nn.loss_and_gradient(net, xb, yb)
            if not np.isfinite(loss) or loss > DIVERGED_LOSS:
                rec["diverged_at"] = step
                return rec
            rec["step"].append(step)
            rec["loss"].append(loss)
            rec["act_q"].append([t.last for t in taps])
            rec["acc"].append(float(np.mean(np.argmax(logits, axis=1) == yb)))
            if kind in ICS_KINDS and step % cfg["ics_every"] == 0:
                ics = landscape.internal_covariate_shift(net, xb, yb, opt.peek(net.gradients()))
                rec["ics_step"].append(step)
                rec["ics_l2"].append(ics.l2.tolist())
                rec["ics_cos"].append(ics.cosine.tolist())
                rec["ics_norm"].append(ics.grad_norm.tolist())
            opt.step(net.gradients())
            step += 1
            progress.update(1)
        evaluate(step)
    train_loss, train_acc = nn.evaluate(net, x_tr, y_tr)
    rec["final_train_loss_eval"] = train_loss
    rec["final_train_acc_eval"] = train_acc
    return rec


class TapReLU(nn.ReLU):
    """A ReLU that keeps the 15/50/85 % quantiles of its input's unit 0 over the batch (the
    block's pre-activation: after BN and noise in the BN networks), for Fig. 2."""

    last = None

    def forward(self, x):
        self.last = np.percentile(np.asarray(x)[:, 0], QUANTILES).tolist()
        return super().forward(x)


def tap_blocks(depth):
    """Hidden blocks (1-based) whose pre-activations Fig. 2 shows: the second and the last."""
    return sorted({min(2, depth - 1), depth - 1})


def attach_taps(net, blocks):
    relus = [i for i, l in enumerate(net.layers) if isinstance(l, nn.ReLU)]
    taps = []
    for b in blocks:
        net.layers[relus[b - 1]] = tap = TapReLU()
        taps.append(tap)
    return taps


def steps_per_epoch(n, batch_size):
    return n // batch_size


# --------------------------------------------------------------------------- figures

def smooth(values, window):
    """Trailing moving average (window clipped at the start), so curves start at step 0."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    i = np.arange(1, v.size + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def _band(ax, runs, key_x, key_y, color, label, window=None, log=False):
    """Mean over seeds with a min..max band; runs that diverged are cut where they stopped."""
    n = min(len(r[key_y]) for r in runs)
    if n == 0:
        return
    ys = np.array([smooth(r[key_y][:n], window) if window else r[key_y][:n] for r in runs])
    x = np.asarray(runs[0][key_x][:n])
    # geometric mean on log axes, so that one seed does not dominate the curve
    mean = np.exp(np.log(np.maximum(ys, 1e-300)).mean(axis=0)) if log else ys.mean(axis=0)
    ax.plot(x, mean, color=color, label=label, lw=1.5)
    if len(runs) > 1:
        ax.fill_between(x, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.2, lw=0)


def plot_training(results, cfg, path, window):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in KINDS:
        runs = results[kind]
        _band(axes[0], runs, "step", "loss", COLORS[kind], LABELS[kind], window, log=True)
        _band(axes[1], runs, "step", "acc", COLORS[kind], LABELS[kind], window)
        _band(axes[2], runs, "eval_step", "test_acc", COLORS[kind], LABELS[kind])
    axes[0].set_yscale("log")
    axes[0].set_title(f"training loss (batch, train mode; {window}-step average)")
    axes[1].set_title(f"training accuracy (batch; {window}-step average)")
    axes[2].set_title("test accuracy (eval mode, after each epoch)")
    axes[0].set_ylabel("cross-entropy loss (nats)")
    axes[1].set_ylabel("accuracy (fraction of the batch)")
    axes[2].set_ylabel("accuracy (fraction of the test set)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{cfg['data']}, {cfg['depth']}-layer ReLU MLP (width {cfg['hidden']}), SGD lr "
                 f"{cfg['lr']} momentum {cfg['momentum']}, batch {cfg['batch_size']}; "
                 f"{cfg['seeds']} seed(s): mean, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ics_layers(depth):
    """Three layers to plot (1-based): the second, a middle one and the last."""
    return sorted({2, (depth + 2) // 2, depth})


def plot_ics(results, cfg, path, window):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = ics_layers(cfg["depth"])
    fig, axes = plt.subplots(3, len(layers), figsize=(5 * len(layers), 10.5), squeeze=False)
    for col, layer in enumerate(layers):
        for kind in ICS_KINDS:
            runs = [dict(r, l2=[v[layer - 1] for v in r["ics_l2"]],
                         rel=[v[layer - 1] / n[layer - 1] if n[layer - 1] > 0 else np.nan
                              for v, n in zip(r["ics_l2"], r["ics_norm"])],
                         cos=[v[layer - 1] for v in r["ics_cos"]]) for r in results[kind]]
            _band(axes[0, col], runs, "ics_step", "l2", COLORS[kind], LABELS[kind], window,
                  log=True)
            _band(axes[1, col], runs, "ics_step", "rel", COLORS[kind], LABELS[kind], window,
                  log=True)
            _band(axes[2, col], runs, "ics_step", "cos", COLORS[kind], LABELS[kind], window)
        axes[0, col].set_yscale("log")
        axes[1, col].set_yscale("log")
        axes[0, col].set_title(f"layer {layer}: ||G - G'||_2")
        axes[1, col].set_title(f"layer {layer}: relative ICS ||G - G'||_2 / ||G||_2")
        axes[2, col].set_title(f"layer {layer}: cos(G, G')")
        axes[0, col].set_ylabel("||G - G'||_2 (loss units per weight unit)")
        axes[1, col].set_ylabel("||G - G'|| / ||G|| (ratio)")
        axes[2, col].set_ylabel("cosine (dimensionless)")
        axes[2, col].set_ylim(top=1.02)
        for ax in axes[:, col]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle("internal covariate shift (Santurkar et al. Fig. 3): G = grad of layer i's "
                 "weights, G' = the same after layers 1..i-1 took the step; "
                 f"{window}-probe average")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_activations(results, cfg, path):
    """Fig. 2: the 15/50/85 % quantiles over the batch of one unit's pre-activation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = tap_blocks(cfg["depth"])
    fig, axes = plt.subplots(len(blocks), len(KINDS), figsize=(4.2 * len(KINDS),
                             3.4 * len(blocks)), squeeze=False, sharex=True)
    for row, block in enumerate(blocks):
        for col, kind in enumerate(KINDS):
            ax = axes[row, col]
            run = results[kind][0]
            q = np.array([a[row] for a in run["act_q"]])
            if q.size:
                steps = np.asarray(run["step"][:len(q)])
                ax.fill_between(steps, q[:, 0], q[:, 2], color=COLORS[kind], alpha=0.3, lw=0,
                                label="15..85 %")
                ax.plot(steps, q[:, 1], color=COLORS[kind], lw=0.8, label="median")
            ax.set_title(f"{LABELS[kind]}: block {block}, unit 0", fontsize=9)
            ax.set_ylabel("pre-activation (input to ReLU)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            if row == len(blocks) - 1:
                ax.set_xlabel("step")
    fig.suptitle("Santurkar et al. Fig. 2: distribution over the batch of one unit's input to "
                 f"the ReLU (after BN and noise), seed {cfg['seed0']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def activation_drift(results, cfg):
    """Per kind and tapped block: median over seeds of the mean |change of the batch median|
    between consecutive steps, in units of that run's typical 15-85 % width (the step-to-step
    instability of the layer's input distribution that noisy BN is meant to create)."""
    out = {}
    for kind in KINDS:
        out[kind] = []
        for row in range(len(tap_blocks(cfg["depth"]))):
            vals = []
            for r in results[kind]:
                q = np.array([a[row] for a in r["act_q"]])
                if len(q) < 3:
                    continue
                width = np.median(q[:, 2] - q[:, 0])
                vals.append(float(np.mean(np.abs(np.diff(q[:, 1]))) / max(width, 1e-12)))
            out[kind].append(float(np.median(vals)) if vals else float("nan"))
    return out


# --------------------------------------------------------------------------- summary

def _stat(values):
    """'mean (min..max)' over seeds; '—' when no seed gives a value."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return "—"
    if v.size == 1:
        return f"{v[0]:.3g}"
    return f"{v.mean():.3g} ({v.min():.3g}..{v.max():.3g})"


def first_step_reaching(run, threshold):
    for s, a in zip(run["eval_step"], run["test_acc"]):
        if a >= threshold:
            return s
    return None


def training_table(results, spe):
    lines = ["| network | diverged | final train loss (last epoch, batches) | "
             "train accuracy (last epoch, batches) | train accuracy (eval) | "
             "test accuracy (final) | best test accuracy | "
             "steps to 90 % test (checked each epoch) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        runs = results[kind]
        ok = [r for r in runs if r["diverged_at"] is None]
        div = f"{len(runs) - len(ok)}/{len(runs)}"
        if not ok:
            lines.append(f"| {LABELS[kind]} | {div} | — | — | — | — | — | — |")
            continue
        last = [np.mean(r["loss"][-spe:]) for r in ok]
        reach = [first_step_reaching(r, 0.9) for r in ok]
        reach_s = _stat([s for s in reach if s is not None]) if any(
            s is not None for s in reach) else "never"
        lines.append(
            f"| {LABELS[kind]} | {div} | {_stat(last)} | "
            f"{_stat([np.mean(r['acc'][-spe:]) for r in ok])} | "
            f"{_stat([r['final_train_acc_eval'] for r in ok])} | "
            f"{_stat([r['test_acc'][-1] for r in ok])} | "
            f"{_stat([max(r['test_acc']) for r in ok])} | {reach_s} |")
    return "\n".join(lines)


def ics_table(results, depth, lo, hi):
    """Per layer, over the probes with lo <= step < hi: the median of one run, then mean
    (min..max) over seeds."""
    lines = ["| layer | ‖G−G′‖ standard | ‖G−G′‖ BN | ‖G−G′‖/‖G‖ standard | ‖G−G′‖/‖G‖ BN "
             "| cos standard | cos BN |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for layer in range(2, depth + 1):
        cells = {}
        for kind in ICS_KINDS:
            l2, rel, cos = [], [], []
            for r in results[kind]:
                keep = [k for k, s in enumerate(r["ics_step"]) if lo <= s < hi]
                if not keep:
                    continue
                a = np.array([r["ics_l2"][k][layer - 1] for k in keep])
                g = np.array([r["ics_norm"][k][layer - 1] for k in keep])
                l2.append(np.median(a))
                rel.append(np.median(a[g > 0] / g[g > 0]) if np.any(g > 0) else np.nan)
                cos.append(np.nanmedian([r["ics_cos"][k][layer - 1] for k in keep]))
            cells[kind] = (_stat(l2), _stat(rel), _stat(cos)) if l2 else ("—",) * 3
        s, b = cells["standard"], cells["bn"]
        lines.append(f"| {layer} | {s[0]} | {b[0]} | {s[1]} | {b[1]} | {s[2]} | {b[2]} |")
    return "\n".join(lines)


def write_summary(path, results, cfg, mode, spe, wall, fig_names):
    import fastbn

    total = cfg["epochs"] * spe
    early = cfg["early_steps"]
    text = f"""# Noisy BN and internal covariate shift (Santurkar et al. 2018, Sec. 2)

Mode: **{mode}**. Data: {cfg['data']} ({cfg['n_train']} training / {cfg['n_test']} test,
standardised features). Network: {cfg['depth']} Linear layers of width {cfg['hidden']},
ReLU; BN networks have fastbn `BatchNorm` after every hidden Linear (whose bias is then dropped).
Same initial weights and batches for the networks of a seed. SGD, lr {cfg['lr']}, momentum
{cfg['momentum']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs ({spe} steps each),
seeds {cfg['seed0']}..{cfg['seed0'] + cfg['seeds'] - 1}. Noisy BN: after each BN,
a ← s⊙a + m with a new draw every step and layer: μ_t ~ U(−0.5, 0.5), σ_t ~ U(1, 1.25),
m ~ U(μ_t − 0.1, μ_t + 0.1), s ~ N(σ_t, 0.1); "per sample" (the paper's, Sec. 2.1): i.i.d.
for each activation of each sample; "per step": one (m, s) per unit shared by the batch. In eval mode (test accuracy) the noise layer
applies its expectation, a ← 1.125·a, as dropout does at inference.

Cells: mean over seeds (min..max over seeds). Figures: {', '.join(fig_names)}.

## Training

{training_table(results, spe)}

## Internal covariate shift (standard vs BN)

Every {cfg['ics_every']} steps, per layer i: G = ∇_{{W_i}} L(W^t), G′ = the same gradient after
layers 1..i−1 took this step's SGD update (same batch, running statistics untouched). Cells:
median over the probes of one run, then mean (min..max) over seeds. Layer 1 has no earlier
layer (G′ = G). Santurkar et al. found that BN networks do *not* have a smaller ICS by this
measure (often a larger one).

### Early training (steps 0–{early - 1})

{ics_table(results, cfg['depth'], 0, early)}

### Whole run (steps 0–{total - 1})

{ics_table(results, cfg['depth'], 0, total)}

Wall time: {wall:.1f} s (fastbn {fastbn.__version__}, {fastbn.get_num_threads()} thread(s),
numpy {np.__version__}, Python {platform.python_version()}).
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    cfg = dict(CONFIGS[mode], seed0=args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    keep = limit_threads(args.threads)  # noqa: F841 - the limit lasts while this lives
    from tqdm import tqdm

    start = time.perf_counter()
    from fastbn.analysis import santurkar

    *data, cfg["data"] = santurkar.load_hard_split()
    cfg["n_train"], cfg["n_test"] = len(data[0]), len(data[2])
    spe = steps_per_epoch(len(data[0]), cfg["batch_size"])
    total = len(KINDS) * cfg["seeds"] * cfg["epochs"] * spe
    results = {k: [] for k in KINDS}
    with tqdm(total=total, desc=f"noisy_bn ({mode})", unit="step",
              disable=args.no_progress, file=sys.stderr) as bar:
        for seed in range(args.seed, args.seed + cfg["seeds"]):
            for kind in KINDS:
                bar.set_postfix(net=kind, seed=seed)
                rec = train(kind, seed, cfg, data, bar)
                if rec["diverged_at"] is not None:  # keep the bar's total honest
                    bar.update(cfg["epochs"] * spe - rec["diverged_at"])
                results[kind].append(rec)
    train_wall = time.perf_counter() - start
    # the numbers first: a plotting failure must not lose the runs
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": cfg, "mode": mode, "train_wall_s": train_wall, "runs": results}, f)
    window = max(1, spe if mode == "full" else 3)
    figs = ["training_curves.png", "ics.png", "activations.png"]
    plot_activations(results, cfg, os.path.join(args.out_dir, figs[2]))
    drift = activation_drift(results, cfg)
    with open(os.path.join(args.out_dir, "activation_drift.json"), "w", encoding="utf-8") as f:
        json.dump({"blocks": tap_blocks(cfg["depth"]), "drift": drift}, f)
    plot_training(results, cfg, os.path.join(args.out_dir, figs[0]), window)
    plot_ics(results, cfg, os.path.join(args.out_dir, figs[1]),
             max(1, 20 // cfg["ics_every"]) if mode == "full" else 1)
    wall = time.perf_counter() - start
    write_summary(os.path.join(args.out_dir, "summary.md"), results, cfg, mode, spe, wall, figs)
    print(f"wrote {', '.join(figs)}, summary.md, results.json to {args.out_dir} "
          f"({wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
