"""Fuzz every public function with random argument combinations, in child processes.

Each case (see tests/_fuzz_cases.py) must end in exactly one of: a TypeError/ValueError naming
the offending argument with nothing written, or a result equal to a float64 reference with
in-place buffers updated as the reference says. A crash (segfault, SIGFPE, abort) kills only
the child: the parent records it against the case that was running and starts a new child
after it. Failures are grouped into classes (function, kind, perturbation tags); a class whose
tags contain another failing class's tags (same function and kind) is folded into it. The
assertion lists every class with a case to replay:

    PYTHONPATH=src python tests/_fuzz_cases.py --target TARGET --seed SEED --case N -v

Seeded and reproducible; FASTBN_FUZZ_SEED and FASTBN_FUZZ_CASES change the seed and the number
of cases per function.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import subprocess_env

HERE = Path(__file__).resolve().parent
CASES = HERE / "_fuzz_cases.py"
SEED = int(os.environ.get("FASTBN_FUZZ_SEED", "0"))
N_CASES = int(os.environ.get("FASTBN_FUZZ_CASES", "1000"))
MAX_CHILDREN = 40      # per target: crashes restart the child after the crashing case
CHILD_TIMEOUT = 120.0  # s per child: a hang is a failure of the case that was running

sys.path.insert(0, str(HERE))
import _fuzz_cases  # noqa: E402

TARGETS = _fuzz_cases.TARGETS
# The layer's cases are sequences of calls; more of them since each is a few calls.
COUNTS = {t: N_CASES for t in TARGETS}


def _signame(rc):
    if rc is not None and rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


def run_target(target, seed, n):
    """Run cases [0, n) of one target; returns the list of failure records."""
    failures = []
    crash_tags = []  # tag sets that crashed: cases containing one are skipped afterwards
    start = 0
    children = 0
    env = subprocess_env(PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        while start < n and children < MAX_CHILDREN:
            children += 1
            log = Path(tmp) / f"{target}-{children}.jsonl"
            cmd = [sys.executable, str(CASES), "--target", target, "--seed", str(seed),
                   "--start", str(start), "--stop", str(n), "--log", str(log),
                   "--skip", json.dumps([sorted(s) for s in crash_tags])]
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                      timeout=CHILD_TIMEOUT)
                rc, stderr = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as exc:
                rc, stderr = "timeout", (exc.stderr or b"").decode(errors="replace") \
                    if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            running = None
            done = False
            last = start - 1
            for line in log.read_text().splitlines() if log.exists() else []:
                rec = json.loads(line)
                if "start" in rec:
                    running = rec
                    last = rec["start"]
                elif "end" in rec:
                    running = None
                    failures.extend(dict(f, case=rec["end"]) for f in rec["fails"])
                elif "skip" in rec:
                    last = rec["skip"]
                elif "done" in rec:
                    done = True
            if done and rc == 0:
                break
            if running is None:  # died outside a case (import error, harness bug)
                failures.append({"target": target, "tags": [], "case": last + 1,
                                 "kind": f"child died outside a case ({_signame(rc)})",
                                 "detail": stderr[-2000:], "desc": ""})
                start = last + 2
                continue
            i = running["start"]
            kind = ("hang (child timed out)" if rc == "timeout"
                    else f"crash: {_signame(rc)}")
            failures.append({"target": target, "tags": running["tags"], "case": i, "kind": kind,
                             "detail": (stderr or "").strip()[-300:] or
                             f"after {time.monotonic() - t0:.1f}s", "desc": ""})
            if running["tags"]:
                crash_tags.append(set(running["tags"]))
            start = i + 1
    return failures


def classify(failures):
    """Distinct classes: (target, kind, tags); supersets of a failing class are folded in."""
    classes = {}
    for f in failures:
        key = (f["target"], f["kind"], tuple(f["tags"]))
        classes.setdefault(key, []).append(f)
    keys = sorted(classes, key=lambda k: (k[0], k[1], len(k[2]), k[2]))
    kept = []
    for k in keys:
        base = next((q for q in kept if q[0] == k[0] and q[1] == k[1]
                     and set(q[2]) <= set(k[2])), None)
        if base is None:
            kept.append(k)
        else:
            classes[base].extend(classes[k])
    return [(k, classes[k]) for k in kept]


def report(classes, seed):
    summary = {}
    for (target, kind, _tags), fs in classes:
        summary.setdefault(kind, {}).setdefault(target, 0)
        summary[kind][target] += 1
    lines = [f"{len(classes)} distinct failure class(es) "
             f"({sum(len(v) for _, v in classes)} failing calls), seed {seed}. By kind "
             "(target: number of classes):"]
    for kind in sorted(summary):
        lines.append(f"  {kind}: " + ", ".join(f"{t} {n}" for t, n in sorted(summary[kind].items())))
    lines.append("Classes (function: kind [perturbations] x calls; first line of the detail; the "
                 "arguments; a case to replay):")
    for (target, kind, tags), fs in classes:
        f = min(fs, key=lambda r: (len(r["tags"]), r["case"]))
        lines.append(f"- {target}: {kind} [{', '.join(tags) or 'no perturbation'}] x{len(fs)}")
        if f["detail"]:
            lines.append(f"    {f['detail'].splitlines()[0][:300]}")
        if f.get("desc"):
            lines.append(f"    {f['desc'].strip()[:300]}")
        lines.append(f"    replay: PYTHONPATH=src python tests/_fuzz_cases.py --target {target} "
                     f"--seed {seed} --case {f['case']} -v")
    return "\n".join(lines)


def test_fuzz_public_api():
    """Every public function against random, partly invalid arguments: see the module doc."""
    pytest.importorskip("numpy")
    jobs = max(1, min(len(TARGETS), os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda t: run_target(t, SEED, COUNTS[t]), TARGETS))
    failures = [f for r in results for f in r]
    harness = [f for f in failures if f["kind"] == "HARNESS ERROR"]
    assert not harness, "bug in the fuzz harness itself:\n" + harness[0]["detail"]
    classes = classify(failures)
    if classes:
        pytest.fail(report(classes, SEED), pytrace=False)
