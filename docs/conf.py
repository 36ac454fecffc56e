"""Sphinx configuration for ghist."""

from __future__ import annotations

from datetime import date
from importlib.metadata import version as _version

project = "ghist"
author = "ghist developers"
copyright = f"{date.today().year}, {author}"
release = _version("ghist")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]

autosummary_generate = True
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "braces"
always_document_param_types = False
nitpicky = False
myst_enable_extensions = ["colon_fence", "dollarmath"]

# Tutorials run at build time on small data so they cannot go stale.
nb_execution_mode = "cache"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_merge_streams = True

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path = ["_templates"]
html_static_path = ["_static"]
html_theme = "sphinx_book_theme"
html_title = "ghist"
html_theme_options = {"repository_url": "https://github.com/ghist-dev/ghist", "use_repository_button": True}

# Builds run offline (CI has no internet), so no intersphinx inventories are fetched.
suppress_warnings = ["config.cache", "mystnb.unknown_mime_type"]
