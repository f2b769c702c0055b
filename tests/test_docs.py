"""Every Python snippet of README.md and docs/ runs, and every docstring example passes.

Snippets of one page run in order in one namespace (a page reads as one session), in a
temporary directory. A snippet whose first line is ``# requires: MODULE`` is skipped, with
that reason, where MODULE cannot be imported (CuPy, mpi4py, torch, SciPy).
"""
import doctest
import importlib
import importlib.util
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```", re.S | re.M)


def snippets(page):
    return [textwrap.dedent(m.group(2)) for m in FENCE.finditer(page.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists() and snippets(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_page_snippets_run(page, tmp_path, monkeypatch):
    blocks = snippets(page)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    ran = 0
    for i, code in enumerate(blocks):
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        m = re.match(r"#\s*requires:\s*([\w.]+)", first)
        if m and importlib.util.find_spec(m.group(1)) is None:
            continue  # reported below if nothing ran
        exec(compile(code, f"{page.name}[snippet {i}]", "exec"), namespace)
        ran += 1
    if not ran:
        pytest.skip(f"every snippet of {page.name} needs a module that is not installed")


@pytest.mark.parametrize("module", ["fastbn.functional", "fastbn.layer"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
