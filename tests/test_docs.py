"""The documentation site (docs/): it builds with warnings as errors, the API page documents
the library, the method page renders its mathematics, and every "docs/method.md §N" cited in
the repository names a section that exists.

The build needs the ``docs`` extra (Sphinx, myst-parser, furo; part of the ``test`` extra).
Without it the build test is skipped, unless ``NC_JAX_REQUIRE_DOCS=1`` (set by ``.ci/run``),
in which case it fails.
"""

from __future__ import annotations

import html
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOCS_PACKAGES = ("sphinx", "myst_parser", "furo")

# "docs/method.md §3", "docs/method.md §3, §6.1", "docs/method.md §7/§10.3", "§8.1–§8.4".
_CITATION = re.compile(r"docs/method\.md((?:[ ,/–-]*(?:and )?§\d+(?:\.\d+)?)+)")
_SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
_HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.MULTILINE)


def _require_docs_packages() -> None:
  missing = [name for name in DOCS_PACKAGES if importlib.util.find_spec(name) is None]
  if not missing:
    return
  message = (f"the docs build needs {', '.join(missing)}: "
             f"pip install -c .ci/constraints.txt -e \".[docs]\"")
  if os.environ.get("NC_JAX_REQUIRE_DOCS") == "1":
    pytest.fail(message + " (NC_JAX_REQUIRE_DOCS=1)")
  pytest.skip(message)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  """The HTML site, built once into a temporary folder with -W --keep-going."""
  _require_docs_packages()
  out = tmp_path_factory.mktemp("docs_html")
  cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(out / ".doctrees"), str(DOCS), str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (
      f"docs build failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
  return out


def _article_text(page: pathlib.Path) -> tuple[str, str]:
  """(the page's main-content HTML, its visible text)."""
  source = page.read_text(encoding="utf-8")
  start, end = source.find("<article"), source.rfind("</article>")
  body = source[start:end] if 0 <= start < end else source
  return body, html.unescape(re.sub(r"<[^>]+>", "", body))


def test_every_page_is_built(site):
  for name in ("index", "getting_started", "method", "heads", "training", "reproducing",
               "benchmarks", "api"):
    assert (site / f"{name}.html").is_file(), name
  assert (site / "_images" / "ufm10_seed1.png").is_file()


def test_api_page_documents_the_public_modules(site):
  body, text = _article_text(site / "api.html")
  # The top-level functions, with their docstrings.
  for name in ("nearest_etf", "normalise_means", "feasibility_solution", "polar_vjp",
               "nc_metrics", "nc_metrics_streaming", "ce_lower_bound", "simplex_etf"):
    assert f'id="nc_jax.{name}"' in body, name
  assert "Nearest simplex ETF to" in text
  # One object from each public module.
  for anchor in ("nc_jax.solver.procrustes_target", "nc_jax.geometry.frobenius_normalise",
                 "nc_jax.stiefel.project_tangent", "nc_jax.class_means.update",
                 "nc_jax.metrics.sorted_cosine_margins", "nc_jax.heads.HeadConfig",
                 "nc_jax.evaluate.nc_evaluate", "nc_jax.train.TrainState", "nc_jax.loop.fit",
                 "nc_jax.config.TrainConfig", "nc_jax.checkpoint.Checkpointer",
                 "nc_jax.optim.agd.agd", "nc_jax.optim.factory.make_optimizer",
                 "nc_jax.models.create", "nc_jax.data.sources.load_split",
                 "nc_jax.newton_schulz.polar"):
    assert f'id="{anchor}"' in body, anchor
  # Google-style "Args:" sections went through napoleon (rendered as "Parameters").
  assert "Args:" not in text and "Parameters" in text
  # Docstring maths reaches MathJax.
  assert 'class="math' in body


def test_method_page_renders_its_mathematics(site):
  page = site / "method.html"
  body, text = _article_text(page)
  assert "mathjax" in page.read_text(encoding="utf-8").lower()
  # $...$ and $$...$$ became MathJax spans and blocks; none is left as raw dollars.
  assert body.count('class="math') > 100
  assert "$" not in text
  assert r"\(P^\star = UV^\top" in text or r"P^\star = UV^\top" in text
  # Numbered equations and their references.
  for label in ("eq-nearest-etf", "eq-procrustes-target", "eq-polar-vjp"):
    assert f'id="equation-{label}"' in body, label
    assert f'href="#equation-{label}"' in body, label
  # Stable section anchors and numbers.
  for anchor, title in (("method-closed-form", "3. The closed form"),
                        ("method-backward", "6. The implicit backward"),
                        ("method-class-means", "7. The class-mean moving average"),
                        ("method-metrics", "9. Neural-collapse metrics"),
                        ("method-agd", "10.1 Optimiser")):
    assert f'id="{anchor}"' in body, anchor
    assert title in text, title


def _method_sections() -> set[str]:
  return set(_HEADING.findall((DOCS / "method.md").read_text(encoding="utf-8")))


def _repository_texts():
  """(path, text) of the repository's Python, Markdown, reST and TOML files."""
  for folder, subfolders, files in os.walk(ROOT):
    subfolders[:] = [d for d in subfolders
                     if not d.startswith(".") and d not in {"_build", "runs", "node_modules"}
                     and not d.endswith(".egg-info") and d != "__pycache__"]
    for name in files:
      if name.endswith((".py", ".md", ".toml", ".rst")):
        path = pathlib.Path(folder) / name
        yield path, path.read_text(encoding="utf-8", errors="replace")


def test_method_sections_are_numbered_consecutively():
  sections = _method_sections()
  top = sorted(int(s) for s in sections if "." not in s)
  assert top == list(range(1, len(top) + 1)), top
  for sub in (s for s in sections if "." in s):
    assert sub.split(".")[0] in sections, sub


def test_every_citation_of_the_method_page_names_an_existing_section():
  sections = _method_sections()
  cited = 0
  bad = []
  for path, text in _repository_texts():
    for match in _CITATION.finditer(text):
      for number in _SECTION.findall(match.group(1)):
        cited += 1
        if number not in sections:
          line = text.count("\n", 0, match.start()) + 1
          bad.append(f"{path.relative_to(ROOT)}:{line}: §{number}")
  assert not bad, "citations of missing docs/method.md sections:\n" + "\n".join(bad)
  assert cited > 0  # the scan found the citations (docs/method.md cites itself, at least)
