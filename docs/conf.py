"""Sphinx configuration of fastbn's documentation (built in CI with warnings as errors:
``sphinx-build -W --keep-going -b html docs docs/_build/html``; doctests with ``-b doctest``)."""
import os
import sys

# The installed fastbn (CI builds the docs against the repaired wheel), or an in-place build of
# this checkout's src/ when it has its compiled kernels.
_src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))
if any(f.startswith("_kernels") and f.endswith((".so", ".pyd"))
       for f in os.listdir(os.path.join(_src, "fastbn"))):
    sys.path.insert(0, _src)

import fastbn  # noqa: E402

project = "fastbn"
author = "The fastbn developers"
copyright = "2026, the fastbn developers"
release = fastbn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
numpydoc_show_class_members = False
numpydoc_validation_checks = set()
autodoc_typehints = "none"          # the numpydoc sections say it in words
autodoc_member_order = "bysource"
intersphinx_mapping = {}            # built offline: no inventories fetched
html_theme = "furo" if __import__("importlib.util").util.find_spec("furo") else "alabaster"
html_title = f"fastbn {release}"
doctest_global_setup = "import numpy as np\nimport fastbn"
