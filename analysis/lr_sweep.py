#!/usr/bin/env python
"""Santurkar et al. (2018), Fig. 1's point: BN trains at step sizes where the plain net cannot.

Trains a deep ReLU perceptron on a task harder than digits (MNIST-1D when the ``mnist1d``
package is installed, generated locally; else a hard ``make_classification`` problem, see
fastbn.analysis.santurkar.load_hard_split) with SGD + momentum at a geometric range of
learning rates: standard, BN, noisy BN (per-sample i.i.d. noise, the paper's) and noisy BN with
per-step noise; same initial weights and batches for all networks of a seed.

Writes lr_sweep.png (final training loss, training accuracy and test accuracy against the
learning rate; mean over seeds, bars = min..max; diverged runs marked at the top),
summary.md and results.json.

    python analysis/lr_sweep.py [OUT_DIR] [--quick] [--seed N] [--threads N]

--quick: seconds (a smoke test); full: about 70 s on 2 cores.
"""
import json
import math
import os
import sys
import time

import numpy as np

import _script
from fastbn.analysis import nn, santurkar

KINDS = ("standard", "bn", "noisy_bn", "noisy_bn_step")
LABELS = {"standard": "standard", "bn": "BN", "noisy_bn": "noisy BN (per sample)",
          "noisy_bn_step": "noisy BN (per step)"}
COLORS = {"standard": "tab:blue", "bn": "tab:orange", "noisy_bn": "tab:green",
          "noisy_bn_step": "tab:olive"}
DIVERGED_LOSS = 1e4
CHANCE_LOSS = math.log(10)
# a run "stalls" if its final training loss is above this fraction of the chance loss log 10
STALL_FRACTION = 0.9

CONFIGS = {
    "quick": dict(depth=4, hidden=32, epochs=2, seeds=1, batch_size=64, momentum=0.9,
                  lrs=(0.03, 0.3, 3.0)),
    "full": dict(depth=10, hidden=64, epochs=15, seeds=3, batch_size=64, momentum=0.9,
                 lrs=(0.01, 0.03, 0.1, 0.3, 1.0)),
}


def build(kind, seed, cfg, n_in):
    return nn.mlp(n_in, cfg["hidden"], 10, cfg["depth"], batch_norm=kind != "standard",
                  noisy_bn=kind.startswith("noisy"),
                  noise="per_step" if kind == "noisy_bn_step" else "per_sample", seed=seed)


def train(kind, lr, seed, cfg, data):
    x_tr, y_tr, x_te, y_te = data
    net = build(kind, seed, cfg, x_tr.shape[1])
    opt = nn.SGD(net.parameters(), lr, momentum=cfg["momentum"])
    order = np.random.default_rng([seed, 1])
    rec = dict(kind=kind, lr=lr, seed=seed, diverged_at=None, batch_loss=[])
    step = 0
    for _ in range(cfg["epochs"]):
        for idx in nn.minibatches(len(x_tr), cfg["batch_size"], order):
            net.resample_noise()
            with np.errstate(all="ignore"):
                loss, _ = nn.loss_and_gradient(net, x_tr[idx], y_tr[idx])
            if not np.isfinite(loss) or loss > DIVERGED_LOSS:
                rec["diverged_at"] = step
                return rec
            rec["batch_loss"].append(loss)
            opt.step(net.gradients())
            step += 1
    with np.errstate(all="ignore"):
        rec["train_loss"], rec["train_acc"] = nn.evaluate(net, x_tr, y_tr)
        rec["test_loss"], rec["test_acc"] = nn.evaluate(net, x_te, y_te)
    if not np.isfinite(rec["train_loss"]):
        rec["diverged_at"] = step
    return rec


def summarise(runs, cfg):
    """{kind: {lr: dict(mean/min/max of train_loss, train_acc, test_acc; diverged count)}}."""
    out = {}
    for kind in KINDS:
        out[kind] = {}
        for lr in cfg["lrs"]:
            rs = [r for r in runs if r["kind"] == kind and r["lr"] == lr]
            ok = [r for r in rs if r["diverged_at"] is None]
            cell = dict(n=len(rs), diverged=len(rs) - len(ok))
            for key in ("train_loss", "train_acc", "test_acc"):
                v = np.array([r[key] for r in ok])
                cell[key] = [float(v.mean()), float(v.min()), float(v.max())] if v.size else None
            # a diverged run counts as stalled; the cell stalls if most seeds stall
            stalled = [r["diverged_at"] is not None
                       or r["train_loss"] > STALL_FRACTION * CHANCE_LOSS for r in rs]
            cell["stalled"] = bool(np.mean(stalled) > 0.5)
            out[kind][str(lr)] = cell
    return out


def plot(summary, cfg, path, data_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = np.array(cfg["lrs"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = (("train_loss", "final training loss (nats, eval mode, full training set)", True),
              ("train_acc", "final training accuracy (fraction)", False),
              ("test_acc", "final test accuracy (fraction)", False))
    for ax, (key, ylabel, log) in zip(axes, panels):
        for j, kind in enumerate(KINDS):
            xs, m, lo, hi, div = [], [], [], [], []
            for lr in lrs:
                c = summary[kind][str(lr)]
                if c[key] is None:
                    div.append(lr)
                    continue
                xs.append(lr * 1.04 ** (j - 1.5))  # small offsets so bars do not overlap
                m.append(c[key][0])
                lo.append(c[key][0] - c[key][1])
                hi.append(c[key][2] - c[key][0])
            ax.errorbar(xs, m, yerr=[lo, hi], color=COLORS[kind], marker="o", ms=4, capsize=3,
                        label=LABELS[kind])
            if div:
                y = ax.get_ylim()[1] if not log else None
                ax.scatter(div, [y if y is not None else 2 * CHANCE_LOSS] * len(div),
                           marker="x", s=60, color=COLORS[kind],
                           label=f"{LABELS[kind]}: all seeds diverged")
        if key == "train_loss":
            ax.axhline(CHANCE_LOSS, color="gray", ls=":", lw=1, label="chance, log 10")
        if key != "train_loss":
            ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance, 0.1")
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("learning rate (SGD, momentum %.1f)" % cfg["momentum"])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data_name}: {cfg['depth']}-layer ReLU MLP (width {cfg['hidden']}), "
                 f"{cfg['epochs']} epochs, batch {cfg['batch_size']}; {cfg['seeds']} seed(s): "
                 "mean, bars = min..max over seeds that did not diverge")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(c, key):
    if c[key] is None:
        return "diverged"
    m, lo, hi = c[key]
    s = f"{m:.3g}" if lo == hi else f"{m:.3g} ({lo:.3g}..{hi:.3g})"
    return s + (f", {c['diverged']}/{c['n']} diverged" if c["diverged"] else "")


def write_summary(path, summary, cfg, mode, wall, data_name):
    lines = [f"# Learning-rate sweep (Santurkar et al. 2018, Fig. 1's point)", "",
             f"Mode **{mode}**. Data: {data_name}. {cfg['depth']}-layer ReLU MLP, width "
             f"{cfg['hidden']}; SGD momentum {cfg['momentum']}, batch {cfg['batch_size']}, "
             f"{cfg['epochs']} epochs, seeds {cfg['seed0']}..{cfg['seed0'] + cfg['seeds'] - 1}. "
             f"Stalled: final training loss > {STALL_FRACTION} × log 10 or diverged (batch "
             f"loss > {DIVERGED_LOSS:g} or not finite), for most seeds. Cells: mean (min..max).",
             "", "| lr | network | train loss | train acc | test acc | stalled |",
             "|---:|---|---:|---:|---:|---|"]
    for lr in cfg["lrs"]:
        for kind in KINDS:
            c = summary[kind][str(lr)]
            lines.append(f"| {lr} | {LABELS[kind]} | {_fmt(c, 'train_loss')} | "
                         f"{_fmt(c, 'train_acc')} | {_fmt(c, 'test_acc')} | "
                         f"{'yes' if c['stalled'] else 'no'} |")
    lines += ["", f"Wall time {wall:.1f} s."]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    args = _script.parse_args(argv, name="lr_sweep", description=__doc__.splitlines()[1])
    mode = "quick" if args.quick else "full"
    cfg = dict(CONFIGS[mode], seed0=args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    keep = _script.limit_threads(args.threads)  # noqa: F841
    from tqdm import tqdm

    start = time.perf_counter()
    *data, data_name = santurkar.load_hard_split()
    jobs = [(k, lr, s) for s in range(args.seed, args.seed + cfg["seeds"])
            for lr in cfg["lrs"] for k in KINDS]
    runs = []
    for kind, lr, seed in tqdm(jobs, desc=f"lr_sweep ({mode})", unit="run",
                               disable=args.no_progress, file=sys.stderr):
        runs.append(train(kind, lr, seed, cfg, data))
    summary = summarise(runs, cfg)
    wall = time.perf_counter() - start
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(dict(config=dict(cfg, lrs=list(cfg["lrs"])), mode=mode, data=data_name,
                       summary=summary, runs=runs, wall_s=wall,
                       stall_fraction=STALL_FRACTION), f)
    plot(summary, cfg, os.path.join(args.out_dir, "lr_sweep.png"), data_name)
    write_summary(os.path.join(args.out_dir, "summary.md"), summary, cfg, mode, wall, data_name)
    print(f"wrote lr_sweep.png, summary.md, results.json to {args.out_dir} ({wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
