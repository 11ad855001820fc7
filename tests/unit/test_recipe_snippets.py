"""The code shown in docs/recipes/*.md is cut from the tested examples/ files (issue 15), so a page
cannot drift from what tests/test_recipes.py runs.

How it works: an example marks a region with the comment lines ``# [recipe:NAME]`` and
``# [/recipe]``; a page puts ``<!-- recipe: examples/FILE.py NAME -->`` on the line before each
```` ```python ```` block, and that block must be the region, dedented. After editing an example,
``python -m tests.unit.test_recipe_snippets`` rewrites the pages' blocks from the regions.
Also checked: every relative link of the recipe pages and the README points at a file, and the
README's python blocks that tests/test_readme.py does not run (fragments) at least parse."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs" / "recipes").glob("*.md"))
REGION = re.compile(r"^[ \t]*# \[recipe:(?P<name>[\w-]+)\]\n(?P<code>.*?)^[ \t]*# \[/recipe\]$", re.M | re.S)
# a python block, with the marker line before it when there is one
BLOCK = re.compile(r"^(?:<!-- recipe: (?P<file>\S+) (?P<name>[\w-]+) -->\n)?```python\n(?P<code>.*?)^```$", re.M | re.S)
LINK = re.compile(r"\]\((?!https?:|#|mailto:)(?P<target>[^)#\s]+)")


def regions(path: Path) -> dict[str, str]:
    """NAME → the region's code, dedented, without the blank lines at its ends."""
    found: dict[str, str] = {}
    for m in REGION.finditer(path.read_text()):
        assert m["name"] not in found, f"{path.name}: two regions named {m['name']}"
        found[m["name"]] = textwrap.dedent(m["code"]).strip("\n") + "\n"
    return found


def synced(page: Path) -> str:
    """The page with each marked block replaced by its region; an unmarked block is an error."""

    def cut(m: re.Match[str]) -> str:
        assert m["file"], f"{page.name}: a ```python block without a <!-- recipe: FILE NAME --> line before it"
        code = regions(ROOT / m["file"]).get(m["name"])
        assert code is not None, f"{page.name}: no region [recipe:{m['name']}] in {m['file']}"
        return f"<!-- recipe: {m['file']} {m['name']} -->\n```python\n{code}```"

    return BLOCK.sub(cut, page.read_text())


def test_every_python_block_of_the_recipes_is_a_region_of_a_tested_example() -> None:
    stale = [page.name for page in PAGES if synced(page) != page.read_text()]
    assert not stale, f"{stale} differ from examples/: run `python -m tests.unit.test_recipe_snippets`"
    assert sum(page.read_text().count("```python") for page in PAGES) >= 7  # the marker regex did match


def test_the_recipes_and_the_readme_link_to_files_that_exist() -> None:
    broken = [
        f"{page.relative_to(ROOT)}: {m['target']}"
        for page in [*PAGES, ROOT / "README.md"]
        for m in LINK.finditer(page.read_text())
        if not (page.parent / m["target"]).exists()
    ]
    assert not broken, broken
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/recipes/{page.name}" in readme for page in PAGES if page.name != "README.md")


def test_the_readme_fragments_that_are_not_run_parse() -> None:
    blocks = re.findall(r"^```python( run)?\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S)
    fragments = [code for run, code in blocks if not run]
    assert fragments, "no fragment found: has the README's block syntax changed?"
    for code in fragments:
        ast.parse(code)


if __name__ == "__main__":
    for page in PAGES:
        page.write_text(synced(page))
