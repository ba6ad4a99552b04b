"""The documentation: the site builds with ``mkdocs build --strict``, and every code example in it runs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
# a fenced block opened by ```python at the start of a line (not indented: no blocks inside admonitions)
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """The ```python blocks of a page in order, each with the line number of its first line."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[str(p.relative_to(DOCS)) for p in PAGES_WITH_CODE])
def test_code_examples_run(page: Path) -> None:
    """A page's blocks run in order in one namespace, as a reader would paste them."""
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    torch.manual_seed(0)
    for line, code in python_blocks(page):
        compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compiled, namespace)  # the docs' own examples, as a reader would run them


def test_blocks_are_found() -> None:
    """The extraction sees the examples (a broken pattern would make the test above vacuous)."""
    blocks = {p.relative_to(DOCS).as_posix(): len(python_blocks(p)) for p in PAGES}
    assert blocks.get("index.md", 0) >= 1 and blocks.get("concepts.md", 0) >= 3, blocks


_DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_tools() -> list[str]:
    missing = []
    for mod in _DOCS_TOOLS:
        try:
            if importlib.util.find_spec(mod) is None:
                missing.append(mod)
        except ModuleNotFoundError:
            missing.append(mod)
    return missing


def test_site_builds_strict(tmp_path: Path) -> None:
    missing = _missing_tools()
    if missing:
        pytest.skip(f"docs tools not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    assert (tmp_path / "api" / "recipes" / "index.html").exists()


# developer notes outside the project: a user has none of them, so nothing may point there
_FORBIDDEN = ("ALGORITHMS" + ".md", "DESIGN" + ".md", "DISTRIBUTED" + ".md", "../" + "shared")


def test_no_citation_of_developer_notes() -> None:
    files = [ROOT / "README.md", ROOT / "mkdocs.yml", *PAGES]
    for folder in ("gradchain", "tests", "benchmarks", "recipes"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md") and p.is_file()]
    hits = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for s in _FORBIDDEN if s in line]
    assert not hits, "the project cites notes its users do not have:\n" + "\n".join(hits)
