"""Every code block of README.md and docs/ runs as written (runner: tests/_helpers/docs_runner)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _helpers.docs_runner import PAGES, ROOT, PageError, Runs, parse_page


def _collect() -> Iterator[Any]:
    for page in PAGES:
        for step in parse_page(page):
            block = step.block
            if block is None or block.covered or not (block.runs or block.skip):
                continue
            marks = []
            if block.skip:
                marks.append(pytest.mark.skip(reason=block.skip))
            if block.xfail:
                marks.append(
                    pytest.mark.xfail(strict=True, reason=block.xfail, raises=block.raises)
                )
            yield pytest.param(page, step.line, id=block.id, marks=marks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    state = Runs(tmp_path_factory.mktemp("docs-code"))
    yield state
    state.close()


@pytest.mark.parametrize(("page", "line"), list(_collect()))
def test_code_block_runs(
    runs: Runs, page: Path, line: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block at ``page:line`` runs, after everything above it on its page."""
    run = runs.get(page)
    monkeypatch.chdir(run.directory)
    target = next(i for i, s in enumerate(run.steps) if s.kind == "block" and s.line == line)
    try:
        run.run_through(target)
    finally:
        if not any(s.block and s.block.runs and not s.block.skip for s in run.steps[target + 1 :]):
            runs.close(page)


def test_directives_are_checked(tmp_path: Path) -> None:
    """A typo in a docs-test comment is an error, not a block silently left out."""
    cases = {
        "<!-- docs-test: skp reason -->\n```python\nx\n```\n": "unknown directive",
        "<!-- docs-test: skip -->\n```python\nx\n```\n": "needs a reason",
        "<!-- docs-test: fixtures no_such_model -->\n": "unknown fixtures",
        "<!-- docs-test: run -->\n```console\n$ ls\n```\n": "bash/sh/shell blocks only",
        "text\n<!-- docs-test: xfail issue 1 -->\n": "with no code block after it",
        "<!-- docs-test: xfail raises=Nope issue 1 -->\n```python\nx\n```\n": "not a built-in",
        "<!-- docs-test: xfail raises=ValueError -->\n```python\nx\n```\n": "needs a reason",
    }
    page = tmp_path / "page.md"
    for text, message in cases.items():
        page.write_text(text)
        with pytest.raises(PageError, match=message):
            parse_page(page)


def test_parser_finds_blocks_and_directives() -> None:
    """Blocks, their languages and their markers, as the runner reads them."""
    page = ROOT / "README.md"
    steps = parse_page(page)
    blocks = [s.block for s in steps if s.block is not None]
    assert blocks, "README.md has code blocks"
    assert {b.language for b in blocks} >= {"bash", "python"}
    text = page.read_text()
    for block in blocks:  # each block's line is its opening fence
        assert text.splitlines()[block.line - 1].lstrip().startswith(("```", "~~~"))
