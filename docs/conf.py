"""Sphinx configuration of the captum_vit documentation (autodoc + napoleon)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MPLBACKEND", "Agg")

import captum_vit

project = "captum_vit"
author = "captum_vit developers"
copyright = "2026, captum_vit developers"
release = captum_vit.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_inherit_docstrings = False
# Captum's base classes and torch types resolve to external projects: do not warn.
nitpicky = False
suppress_warnings = ["ref.python"]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"captum_vit {release}"
