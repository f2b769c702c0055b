"""One report: every figure of the analysis scripts, and a verdict per claim of the two papers.

Runs kohler_equivalence.py, kohler_convergence.py, noisy_bn.py and landscape.py (each into its
own sub-folder of OUT_DIR), then writes OUT_DIR/report.md: for each claim of Kohler et al.
(AISTATS 2019) and Santurkar et al. (NeurIPS 2018), the claim, our figure, our numbers, a
verdict (reproduced / not reproduced / different) and why. Every verdict is computed in this
run from the numbers of this run and the thresholds stated in report.md; none is written in.

    python analysis/report.py OUT_DIR [--quick] [--seed N] [--threads N]

--quick: every script in its quick mode (about 5 s on 2 cores; tiny networks, so its Santurkar
verdicts are smoke tests); full: about 8 minutes on 2 shared cores.
"""
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _script  # noqa: E402

# thresholds (Santurkar claims); Kohler thresholds live in kohler_convergence.py
EQ_TOL64 = 1e-10        # identity "holds" in float64 if max relative difference <= this
NOISY_ACC_TOL = 0.02    # noisy BN "trains as well as BN": test accuracy within this of BN's
SMOOTH_RATIO = 0.8      # "BN smoother": BN's median <= this x the standard net's
ICS_RATIO = 0.8


def _run(module, sub, args, extra=()):
    mod = __import__(module)
    argv = [os.path.join(args.out_dir, sub), "--seed", str(args.seed), *extra]
    if module != "kohler_equivalence":  # it has no --threads option
        argv += ["--threads", str(args.threads)]
    if args.quick:
        argv.append("--quick")
    if module in ("noisy_bn", "landscape") and args.no_progress:
        argv.append("--no-progress")
    t0 = time.perf_counter()
    mod.main(argv)
    return time.perf_counter() - t0


def equivalence_claim(seed):
    """Kohler Sec. 2: BN(XW) = (X - mu) Ŵ + beta; computed here with fastbn.analysis.run_checks."""
    from fastbn.analysis import run_checks

    rng = np.random.default_rng(seed)
    worst = 0.0
    for n, d, k in ((64, 8, 4), (512, 32, 16)):
        A = rng.standard_normal((d, d)) * np.geomspace(1, 30, d)
        X = rng.standard_normal((n, d)) @ A + rng.standard_normal(d)
        W = rng.standard_normal((d, k))
        res = run_checks(X, W, rng.uniform(0.5, 2, k), rng.standard_normal(k), 1e-5)
        worst = max(worst, max(r.max_rel for r in res))
    ok = worst <= EQ_TOL64
    return dict(paper="Kohler", claim="BN is a reparameterisation of the weights: "
                "BN(XW) = (X − μ)Ŵ + β with ŵ = γ w/‖w‖_S (Sec. 2), weight norm is S = I; "
                "forward and gradients",
                figure="kohler_equivalence/kohler_equivalence.png",
                numbers=f"largest relative difference over the five checks, float64: {worst:.1e}",
                verdict="reproduced" if ok else "not reproduced",
                why=f"threshold {EQ_TOL64:g} in float64")


def noisy_claims(out):
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    runs = res["runs"]

    def mean(kind, key):
        vals = [r[key][-1] for r in runs[kind] if r[key]]
        return float(np.mean(vals)) if vals else float("nan")

    acc = {k: mean(k, "test_acc") for k in runs}
    ok = acc["noisy_bn"] >= acc["bn"] - NOISY_ACC_TOL
    claims = [dict(paper="Santurkar", claim="BN's benefit does not come from stable layer-input "
                   "distributions: BN with injected time-varying noise ('noisy BN') trains about "
                   "as well as BN (Sec. 2.1, Fig. 2)",
                   figure="noisy_bn/training_curves.png",
                   numbers=f"final test accuracy: standard {acc['standard']:.3f}, BN "
                           f"{acc['bn']:.3f}, noisy BN {acc['noisy_bn']:.3f}",
                   verdict="reproduced" if ok else "not reproduced",
                   why=f"noisy BN within {NOISY_ACC_TOL} of BN" if ok else
                       f"noisy BN more than {NOISY_ACC_TOL} below BN")]
    # ICS: median over all measured steps of ||G - G'|| in the last layer, BN vs standard
    med = {}
    for k in ("standard", "bn"):
        vals = [v[-1] for r in runs[k] for v in r["ics_l2"]]
        med[k] = float(np.median(vals)) if vals else float("nan")
    lower = med["bn"] <= ICS_RATIO * med["standard"]
    higher = med["bn"] >= med["standard"] / ICS_RATIO
    claims.append(dict(
        paper="Santurkar", claim="BN does not reduce internal covariate shift in their gradient "
        "sense (‖G − G′‖, Sec. 2.2, Fig. 3: BN's is similar or larger)",
        figure="noisy_bn/ics.png",
        numbers=f"median ‖G − G′‖ (last layer, all probes): standard {med['standard']:.3g}, "
                f"BN {med['bn']:.3g}",
        verdict="reproduced" if not lower else "different",
        why=("BN's ICS is not below " + f"{ICS_RATIO}× the standard net's" +
             (" (it is larger)" if higher else "")) if not lower else
            f"BN's ICS is below {ICS_RATIO}× the standard net's here (small MLP, digits)"))
    return claims


def landscape_claims(out):
    sys.path.insert(0, HERE)
    import landscape as L

    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    cfg = res["config"]
    claims = []
    for key, label, what in (("loss_range", "loss variation (range of L(W − η′g) over η′)",
                              "Fig. 4a"),
                             ("grad_diff_max", "gradient predictiveness (max ‖g − g′‖ over η′)",
                              "Fig. 4b"),
                             ("beta", "effective β-smoothness", "Fig. 4c")):
        parts, ok_all = [], True
        for lr in cfg["lrs"]:
            m = {}
            for kind in ("standard", "bn"):
                vals = [L.probe_medians(r, 0, cfg["early_steps"])
                        for r in res["runs"][f"{kind}@lr={lr}"]]
                vals = [v[key] for v in vals if v is not None]
                m[kind] = float(np.median(vals)) if vals else float("nan")
            ok = m["bn"] <= SMOOTH_RATIO * m["standard"]
            ok_all &= ok
            parts.append(f"lr {lr}: BN {m['bn']:.3g} vs standard {m['standard']:.3g}")
        claims.append(dict(
            paper="Santurkar", claim=f"BN makes the landscape smoother: lower {label} ({what})",
            figure="landscape/landscape.png",
            numbers=f"median over probes in steps 0-{cfg['early_steps'] - 1}: " + "; ".join(parts),
            verdict="reproduced" if ok_all else "not reproduced",
            why=f"BN <= {SMOOTH_RATIO}× standard at every lr" if ok_all else
                f"BN > {SMOOTH_RATIO}× standard at some lr"))
    return claims


def kohler_claims(out):
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    return [dict(paper="Kohler", claim=v["claim"], figure="kohler_convergence/"
                 "kohler_convergence.png", numbers=v["numbers"], verdict=v["verdict"],
                 why=v["why"]) for v in res["verdicts"]]


def main(argv=None):
    args = _script.parse_args(argv, name="report", description=__doc__.splitlines()[0])
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    times = {}
    times["kohler_equivalence"] = _run("kohler_equivalence", "kohler_equivalence", args)
    times["kohler_convergence"] = _run("kohler_convergence", "kohler_convergence", args)
    times["noisy_bn"] = _run("noisy_bn", "noisy_bn", args)
    times["landscape"] = _run("landscape", "landscape", args)
    claims = [equivalence_claim(args.seed)]
    claims += kohler_claims(os.path.join(args.out_dir, "kohler_convergence"))
    claims += noisy_claims(os.path.join(args.out_dir, "noisy_bn"))
    claims += landscape_claims(os.path.join(args.out_dir, "landscape"))
    wall = time.perf_counter() - t0
    mode = "quick" if args.quick else "full"
    lines = ["# Batch norm: the science, reproduced", "",
             f"Mode **{mode}**, seed {args.seed}; total {wall:.0f} s (" +
             ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ").", "",
             "Every verdict below is computed from this run's numbers. Thresholds: "
             f"identities hold if the float64 relative difference is <= {EQ_TOL64:g}; noisy BN "
             f"trains as well as BN if its test accuracy is within {NOISY_ACC_TOL}; a landscape "
             f"measure or ICS is 'lower' if BN's median is <= {SMOOTH_RATIO}× the standard "
             "net's; Kohler rate thresholds are in kohler_convergence/kohler_convergence.md. "
             + ("Quick mode uses small networks and few steps: its Santurkar verdicts are smoke "
                "tests, not evidence." if args.quick else ""), "",
             "| paper | claim | figure | our numbers | verdict | why |",
             "|---|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['paper']} | {c['claim']} | [{os.path.basename(c['figure'])}]"
                     f"({c['figure']}) | {c['numbers']} | **{c['verdict']}** | {c['why']} |")
    lines += ["", "## Figures", ""]
    for fig in sorted({c["figure"] for c in claims}):
        lines.append(f"![{fig}]({fig})")
        lines.append("")
    with open(os.path.join(args.out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(dict(mode=mode, wall_s=wall, times=times, claims=claims), f, indent=1)
    print(f"report ({mode}): {wall:.0f} s; wrote {os.path.join(args.out_dir, 'report.md')}")
    for c in claims:
        print(f"  [{c['verdict']}] {c['paper']}: {c['claim'][:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
