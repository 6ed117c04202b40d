"""Every python block of the documentation pages runs, in order, per page."""

from __future__ import annotations

import pathlib
import re
import sys
import types

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text())


def blocks(page: pathlib.Path) -> list:
  """The page's ```python blocks, in order."""
  return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def test_the_porting_guide_has_executed_examples():
  assert DOCS / "porting.md" in PAGES
  assert len(blocks(DOCS / "porting.md")) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_code_blocks_run_in_order(page):
  # A module of its own, so that dataclasses (Flax modules) defined on the
  # page find their namespace.
  module = types.ModuleType(f"docs_{page.stem}")
  sys.modules[module.__name__] = module
  executed = 0
  try:
    for index, code in enumerate(blocks(page)):
      try:
        exec(compile(code, f"{page.name}, block {index + 1}", "exec"), module.__dict__)
      except Exception as error:
        raise AssertionError(f"{page.name}, block {index + 1} failed: {error!r}") from error
      executed += 1
  finally:
    del sys.modules[module.__name__]
  assert executed == len(blocks(page)) > 0
  defined = {name for name in vars(module) if not name.startswith("__")}
  assert defined, f"{page.name}: its examples defined nothing"


def test_readme_and_benchmarks_page_stay_short():
  root = DOCS.parent
  assert len((root / "README.md").read_bytes()) <= 10_000
  assert len((root / "BENCHMARKS.md").read_bytes()) <= 20_000


def test_every_page_is_in_the_site_index():
  index = (DOCS / "index.md").read_text()
  for page in DOCS.glob("*.md"):
    if page.stem != "index":
      assert f"\n{page.stem}\n" in index, page.name
