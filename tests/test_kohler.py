"""fastbn.analysis.kohler: Kohler et al.'s length-direction decoupled GD, and the --quick scripts."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbn
from fastbn.analysis import kohler as K

ROOT = Path(__file__).resolve().parents[1]


def _script_env():
    for module in ("matplotlib", "sklearn", "tqdm"):
        pytest.importorskip(module, reason=f"the analysis scripts need {module}")
    # the child imports the fastbn this process imported (the source tree or an installed copy)
    here = str(Path(fastbn.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""),
                MPLBACKEND="Agg")


def w0(d=6, seed=1):
    return np.random.default_rng(seed).standard_normal(d)


@pytest.mark.parametrize("kind", ["ols", "halfspace"])
def test_bn_gd_decreases_monotonically_and_meets_the_bound(kind):
    make = K.ols_problem if kind == "ols" else K.halfspace_problem
    P = make(d=6, kappa=20.0, seed=0)
    T = 300
    r = K.decoupled_gd(P, w0(), T)
    assert np.all(np.diff(r.subopt) <= 1e-14)
    q = K.bound_rate(P)
    env = r.rho_gap[0] * q ** np.arange(T + 1)
    assert np.all(r.rho_gap <= env * (1 + 1e-6) + 1e-15)
    rate, r2, (start, stop) = K.fit_rate(r.subopt)
    assert stop - start > 50
    assert r2 > 0.98                      # log-suboptimality close to a line
    assert rate <= q * (1 + 1e-9)         # at least as fast as the paper's bound


def test_ols_direction_step_is_the_pinvit_step():
    P = K.ols_problem(d=5, kappa=7.0, seed=3)
    w = w0(5)
    r = K.decoupled_gd(P, w, 1)
    c = float(w @ P.S @ w) / float(P.u @ w)
    np.testing.assert_allclose(r.w, w + (c * P.u - P.S @ w) / P.L, rtol=1e-12)


@pytest.mark.parametrize("kind", ["ols", "halfspace"])
def test_bisection_finds_the_optimal_length(kind):
    make = K.ols_problem if kind == "ols" else K.halfspace_problem
    P = make(d=5, kappa=5.0, seed=2)
    w = w0(5)
    g = P.best_length(w, tol_steps=60)
    n = P.s_norm(w)
    if kind == "ols":
        assert abs(g - (-float(P.u @ w) / n)) < 1e-12
    else:
        # derivative zero and a minimum along the ray
        assert abs(P.dloss_dg(w, g, P.S)) < 1e-10
        f = lambda s: P.loss(s * w / n)  # noqa: E731
        assert f(g) <= min(f(g - 1e-3), f(g + 1e-3))
    # the bracket halves each step
    a, b = -3.0, 5.0
    root = 1.2345
    got = K.bisection(lambda x: x - root, a, b, 30)
    assert abs(got - root) <= (b - a) * 2.0 ** -31


def test_s_equal_identity_is_weight_normalisation():
    rng = np.random.default_rng(0)
    u = rng.standard_normal(6)
    P = K.Problem("halfspace", np.eye(6), u)
    a = K.decoupled_gd(P, w0(), 40, norm="S")
    b = K.decoupled_gd(P, w0(), 40, norm="I")
    np.testing.assert_allclose(a.subopt, b.subopt, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.w, b.w, rtol=1e-12)


def test_deterministic_with_a_seed():
    runs = [K.decoupled_gd(K.halfspace_problem(d=5, kappa=10, seed=4), w0(5), 30).subopt
            for _ in range(2)]
    np.testing.assert_array_equal(*runs)
    X, y = K.mlp_data(n=64, d=4, seed=1)
    a = K.train_mlp("BN-GD (decoupled)", X, y, steps=5, lr=0.03, seed=1)
    b = K.train_mlp("BN-GD (decoupled)", X, y, steps=5, lr=0.03, seed=1)
    np.testing.assert_array_equal(a, b)


def test_mlp_methods_train():
    X, y = K.mlp_data(n=128, d=6, seed=0)
    for method, lr in (("GD", 0.3), ("BN + GD", 0.3), ("BN-GD (decoupled)", 0.03)):
        L = K.train_mlp(method, X, y, steps=40, lr=lr)
        assert np.isfinite(L).all() and L[-1] < 0.5 * L[0], method
    with pytest.raises(ValueError):
        K.train_mlp("Adam", X, y)


def test_fit_rate_on_an_exact_geometric_sequence():
    v = 3.0 * 0.7 ** np.arange(60)
    rate, r2, _ = K.fit_rate(v)
    assert math.isclose(rate, 0.7, rel_tol=1e-10) and r2 > 1 - 1e-12


def test_kohler_convergence_script_quick(tmp_path):
    out = tmp_path / "kc"
    res = subprocess.run([sys.executable, str(ROOT / "analysis" / "kohler_convergence.py"),
                          str(out), "--quick"], capture_output=True, text=True, timeout=120,
                         env=_script_env())
    assert res.returncode == 0, res.stderr
    for name in ("kohler_convergence.png", "kohler_convergence.md", "results.json"):
        assert (out / name).stat().st_size > 0
    assert "reproduced" in (out / "kohler_convergence.md").read_text()


def test_report_quick(tmp_path):
    out = tmp_path / "r"
    res = subprocess.run([sys.executable, str(ROOT / "analysis" / "report.py"), str(out),
                          "--quick", "--no-progress"], capture_output=True, text=True,
                         timeout=300, env=_script_env())
    assert res.returncode == 0, res.stderr
    text = (out / "report.md").read_text()
    assert text.count("| Kohler |") >= 7 and text.count("| Santurkar |") >= 4
    for fig in ("kohler_equivalence/kohler_equivalence.png",
                "kohler_convergence/kohler_convergence.png", "noisy_bn/training_curves.png",
                "noisy_bn/ics.png", "landscape/landscape.png"):
        assert (out / fig).stat().st_size > 0, fig
