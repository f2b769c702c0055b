#!/usr/bin/env bash
# CI: the asv suite works end to end, as README's "### asv" runs it, in environments asv builds:
# `asv run` on the last two commits (each built into a wheel and installed into a virtualenv
# asv makes; fastbn is built once per commit) for ONE cheap benchmark, then `asv publish`, and
# the HTML report exists. Results, environments and HTML go to a temporary directory; the
# checkout's .asv/ is untouched. Needs git, Python, pip and a C compiler; a few minutes.
#
#   bash .ci/asv.sh                 # BENCH=REGEX to pick another benchmark, KEEP=1 to keep the dir
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# asv matches parameterised benchmarks as NAME(PARAMS): the fastbn cells of the per-call one.
BENCH=${BENCH:-"^bench_batchnorm\\.BatchNormCallOverhead\\.time_call\\('fastbn'"}

python -c 'import asv, virtualenv' 2>/dev/null || python -m pip install --quiet "asv>=0.6" virtualenv
git rev-parse --verify -q HEAD~1 >/dev/null || { echo "asv.sh: needs two commits (a clone with --depth >= 2)"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/fastbn-asv.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
echo "asv.sh: working in $TMP"

# The repository's configuration with every output directory moved into $TMP.
python - "$ROOT" "$TMP" <<'PY'
import json, os, sys
from asv.util import load_json

root, tmp = sys.argv[1:]
conf = load_json(os.path.join(root, "asv.conf.json"), js_comments=True)
conf.update(repo=root, benchmark_dir=os.path.join(root, "benchmarks"),
            env_dir=os.path.join(tmp, "env"), results_dir=os.path.join(tmp, "results"),
            html_dir=os.path.join(tmp, "html"),
            # publish graphs the commits of HEAD's history (a branch or a detached CI checkout)
            branches=["HEAD"])
with open(os.path.join(tmp, "asv.conf.json"), "w") as f:
    json.dump(conf, f, indent=1)
PY
CONF=$TMP/asv.conf.json

python -m asv machine --yes --config "$CONF" --machine fastbn-ci >/dev/null
for rev in "HEAD~1^!" "HEAD^!"; do
    echo "asv.sh: asv run $rev --bench $BENCH"
    python -m asv run --config "$CONF" --machine fastbn-ci --quick --show-stderr \
        --bench "$BENCH" "$rev"
done
python -m asv publish --config "$CONF"

# Both commits have a result for the benchmark, and the report was written.
python - "$TMP" "$(git rev-parse HEAD~1)" "$(git rev-parse HEAD)" <<'PY'
import glob, json, os, sys

tmp, *commits = sys.argv[1:]
found = {}
for path in glob.glob(os.path.join(tmp, "results", "fastbn-ci", "*.json")):
    if path.endswith("machine.json"):
        continue
    with open(path) as f:
        data = json.load(f)
    res = data.get("results", {})
    if res and any(v and v[0] is not None for v in res.values()):
        found[data["commit_hash"]] = sorted(res)
missing = [c[:8] for c in commits if c not in found]
assert not missing, f"no asv result for {missing} (have {sorted(found)})"
for name in ("index.html", "index.json"):
    assert os.path.isfile(os.path.join(tmp, "html", name)), f"asv publish wrote no {name}"
graphs = [g for b in found[commits[-1]]
          for g in glob.glob(os.path.join(tmp, "html", "graphs", "**", b + ".json"),
                             recursive=True)]
assert graphs, "asv publish drew no graph of the benchmark"
points = sum(len(json.load(open(g))) for g in graphs)
assert points >= 2, f"the graphs hold {points} point(s), expected one per commit"
print(f"asv.sh: ok: results of {len(found)} commits ({', '.join(c[:8] for c in commits)}): "
      f"{found[commits[-1]]}; HTML in {os.path.join(tmp, 'html')}")
PY
