"""Sphinx configuration for the nc_jax documentation.

Build (from the repository root, no network needed):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

# The package imports from the checkout even without ``pip install -e``.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "nc_jax"
author = "nc_jax contributors"
copyright = "2026, nc_jax contributors"  # noqa: A001 (Sphinx's name)

try:
  from nc_jax import __version__ as release
except ImportError:  # pragma: no cover - the API page would fail anyway
  release = "0.1.0"
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ and $$...$$ math (rendered by MathJax in the browser), (label)= anchors.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# Autodoc: document what each module exports; signatures without the type hints (they
# are long jax.Array unions), types in the parameter descriptions instead.
autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True

# Google-style docstrings ("Args:", "Returns:", "Raises:", "Attributes:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
# "Attributes:" as :ivar: fields of the class, so autodoc's own entries for dataclass
# fields do not collide with them.
napoleon_use_ivar = True

# No intersphinx: the build must not need the network. MathJax is loaded from its CDN by
# the reader's browser, not by the build.
html_theme = "furo"
html_title = f"nc_jax {release}"
html_static_path: list[str] = []
pygments_style = "sphinx"
# Unqualified names ("HeadState", not "nc_jax.heads.HeadState") for cross-referenced types.
python_use_unqualified_type_names = True


def _skip_field_entries(app, what, name, obj, skip, options):
  """Skip autodoc's separate entries for NamedTuple and dataclass fields.

  The classes describe their fields in an "Attributes:" section (rendered as ``:ivar:``
  fields by napoleon) and the signature lists them; autodoc's own entries would repeat
  each field without a description ("Alias for field number 0" for a NamedTuple).
  """
  if what != "class" or skip:
    return None
  if type(obj).__name__ == "_tuplegetter":  # a NamedTuple field
    return True
  if name in _DATACLASS_FIELDS and not callable(obj) and not isinstance(obj, property):
    return True
  return None


def _dataclass_field_names() -> frozenset[str]:
  """Field names of the dataclasses (also Flax structs and Linen modules) in nc_jax."""
  import dataclasses
  import importlib
  import pkgutil

  import nc_jax

  names: set[str] = set()
  for info in pkgutil.walk_packages(nc_jax.__path__, "nc_jax."):
    try:
      module = importlib.import_module(info.name)
    except Exception:  # noqa: BLE001 - an optional extra missing: autodoc reports it
      continue
    for value in vars(module).values():
      if isinstance(value, type) and dataclasses.is_dataclass(value):
        if getattr(value, "__module__", "").startswith("nc_jax"):
          names.update(f.name for f in dataclasses.fields(value))
  return frozenset(names)


_DATACLASS_FIELDS: frozenset[str] = frozenset()


def setup(app):
  global _DATACLASS_FIELDS
  _DATACLASS_FIELDS = _dataclass_field_names()
  app.connect("autodoc-skip-member", _skip_field_entries)
  return {"parallel_read_safe": True}
