"""Every fenced code block of docs/ and README.md runs, so that no page drifts from the code.

Blocks with ``>>>`` prompts are doctests: pytest runs them (pyproject: ``--doctest-glob=*.md``).
This runner executes the other blocks:

* ```` ```python ```` (also ``py``, ``python3``, ``py3`` and the brace form
  ```` ``` { .python title="..." } ````) blocks run as Python, one test per block, in the order of
  the page and in one namespace per page (a block sees what the blocks above it defined), with a
  fresh temporary directory of the page as the working directory (it holds a link ``examples``
  to the repository's examples). ``--8<-- "path"`` lines are replaced by the file, as the
  site's snippets extension does.
* Blocks in any other language (``bash``, ``console``, ``text``, ...) are not run, unless marked.

A page steers the runner with HTML comments, invisible on the site. Each starts with
``docs-test:``; the first four apply to the next code block of the page:

``<!-- docs-test: skip REASON -->``
    do not run the next block (it is shown as skipped, with the reason).
``<!-- docs-test: covered REASON -->``
    the next block is run elsewhere (the example file that a ``run`` block above runs, which a
    snippet shows): no test of its own, so no skipped test either.
``<!-- docs-test: xfail [raises=ERROR] REASON -->``
    the next block is expected to fail, because of a known bug named in REASON, with ERROR (a
    built-in or tonumpy exception; any other error fails the test): a strict xfail, so the test
    turns red once the bug is fixed and the marker must go.
``<!-- docs-test: run -->``
    run the next block although it is not Python: a ``bash``/``sh``/``shell`` block runs with
    ``bash -euo pipefail`` in the page's directory.
``<!-- docs-test: fixtures NAME ... -->``
    define the names that the fixtures of tests/_helpers/docs_fixtures.py return (tiny Hugging Face
    models from configs, loaders of variable-length batches, a one-rank process group, ...).
``<!-- docs-test: setup`` (newline) ``CODE`` (newline) ``-->``
    run hidden Python ``CODE`` in the page's namespace at this point (definitions a block
    assumes, files it reads).

Fixtures and setup run, in page order, before the first block below them. A block that raises
fails its test; the blocks after it still run, in the namespace as it was left.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tonumpy
from _helpers.docs_fixtures import FIXTURES, PageContext

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

PYTHON = {"python", "py", "python3", "py3"}
SHELL = {"bash", "sh", "shell"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>.*)$")
_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(?P<word>[\w-]+)(?P<rest>.*?)-->", re.DOTALL)
_SNIPPET = re.compile(r'^[ \t]*--8<--[ \t]+"(?P<path>[^"]+)"[ \t]*$', re.MULTILINE)


@dataclass
class Block:
    """One fenced code block and what the page says about it."""

    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None = None
    covered: str | None = None  # run by another block: no test of its own
    xfail: str | None = None
    raises: type[BaseException] | None = None  # the error an xfail block must fail with
    run: bool = False

    @property
    def id(self) -> str:
        return f"{_name(self.page)}:{self.line}"

    @property
    def runs(self) -> bool:
        return (self.language in PYTHON and not _is_doctest(self.code)) or self.run


@dataclass
class Step:
    """Something a page does, in order: a block, hidden setup code, or fixtures."""

    kind: str  # "block", "setup", "fixtures"
    line: int
    block: Block | None = None
    code: str = ""
    names: tuple[str, ...] = ()


def _name(page: Path) -> str:
    """A page as tests name it: relative to the repository."""
    try:
        return page.relative_to(ROOT).as_posix()
    except ValueError:
        return page.as_posix()


def _is_doctest(code: str) -> bool:
    return any(line.lstrip().startswith(">>>") for line in code.splitlines())


def _language(info: str) -> str:
    info = info.strip()
    if info.startswith("{"):  # { .python title="..." }
        match = re.search(r"\.([\w+-]+)", info)
        return match.group(1).lower() if match else ""
    return info.split()[0].lower() if info else ""


class PageError(Exception):
    """A page's docs-test comments are wrong (an unknown directive or fixture, ...)."""


def _directive(
    m: re.Match[str], page: Path, line: int, steps: list[Step], pending: dict[str, Any]
) -> None:
    """Record one docs-test comment: a step (fixtures, setup) or a mark for the next block."""
    word, rest = m.group("word"), m.group("rest")
    where = f"{_name(page)}:{line}"
    if word in ("skip", "xfail", "covered"):
        raises = re.match(r"\s*raises=(\w+)", rest) if word == "xfail" else None
        if raises:
            error = getattr(builtins, raises.group(1), None) or getattr(
                tonumpy, raises.group(1), None
            )
            if not (isinstance(error, type) and issubclass(error, BaseException)):
                raise PageError(f"{where}: {raises.group(1)} is not a built-in or tonumpy error")
            pending["raises"], rest = error, rest[raises.end() :]
        if not rest.strip():
            raise PageError(f"{where}: docs-test: {word} needs a reason")
        pending[word] = " ".join(rest.split())
    elif word == "run":
        pending["run"] = True
    elif word == "fixtures":
        names = tuple(rest.split())
        unknown = [n for n in names if n not in FIXTURES]
        if unknown or not names:
            raise PageError(f"{where}: unknown fixtures {unknown}; known: {sorted(FIXTURES)}")
        steps.append(Step("fixtures", line, names=names))
    elif word == "setup":
        steps.append(Step("setup", line, code=rest))
    else:
        raise PageError(
            f"{where}: unknown directive docs-test: {word} (known: skip, xfail, covered, run, "
            "fixtures, setup)"
        )


def _fence(page: Path, lines: list[str], i: int) -> tuple[Block, int] | None:
    """The code block whose opening fence is line ``i`` (0-based), and the line after it."""
    fence = _FENCE.match(lines[i])
    if fence is None:
        return None
    indent, mark = fence.group("indent"), fence.group("fence")
    body: list[str] = []
    j = i + 1
    while j < len(lines):
        stripped = lines[j].strip()
        if stripped.startswith(mark[0] * len(mark)) and not stripped.strip(mark[0]):
            break
        body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
        j += 1
    block = Block(page, i + 1, _language(fence.group("info")), "\n".join(body) + "\n")
    return block, j + 1


def parse_page(page: Path) -> list[Step]:
    """The steps of ``page``: its code blocks, setup code and fixtures, in order."""
    text = page.read_text(encoding="utf-8")
    lines = text.splitlines()
    steps: list[Step] = []
    pending: dict[str, Any] = {}
    # the comments, by the line where each starts (those inside code blocks are never reached)
    directives = {text.count("\n", 0, m.start()) + 1: m for m in _DIRECTIVE.finditer(text)}
    i = 0
    while i < len(lines):
        if i + 1 in directives:
            m = directives[i + 1]
            _directive(m, page, i + 1, steps, pending)
            i = text.count("\n", 0, m.end()) + 1  # continue on the line after the comment
            continue
        found = _fence(page, lines, i)
        if found is None:
            i += 1
            continue
        block, i = found
        block.skip, block.xfail = pending.pop("skip", None), pending.pop("xfail", None)
        block.covered = pending.pop("covered", None)
        block.raises = pending.pop("raises", None)
        block.run = pending.pop("run", False)
        if block.run and block.language not in SHELL:
            raise PageError(f"{block.id}: docs-test: run works on bash/sh/shell blocks only")
        steps.append(Step("block", block.line, block=block))
    if pending:
        raise PageError(f"{_name(page)}: docs-test: {sorted(pending)} with no code block after it")
    return steps


def _expand_snippets(code: str) -> str:
    def include(m: re.Match[str]) -> str:
        return (ROOT / m.group("path")).read_text(encoding="utf-8")

    return _SNIPPET.sub(include, code)


@dataclass
class PageRun:
    """The state of one page being run: its namespace, directory and progress."""

    page: Path
    steps: list[Step]
    directory: Path
    module: types.ModuleType
    done: int = 0  # steps run so far
    context: PageContext = field(init=False)

    def __post_init__(self) -> None:
        self.context = PageContext(self.directory, self.module.__dict__)

    def execute(self, step: Step) -> None:
        where = f"{_name(self.page)}:{step.line}"
        if step.kind == "fixtures":
            for name in step.names:
                self.module.__dict__.update(FIXTURES[name](self.context))
        elif step.kind == "setup":
            self._exec(step.code, step.line, f"{where} (setup)")
        elif step.block is not None and step.block.language in SHELL:
            self._shell(step.block)
        elif step.block is not None:
            self._exec(_expand_snippets(step.block.code), step.line + 1, where)

    def run_through(self, target: int) -> None:
        """Run what is left of the page above step ``target`` (a block), then that block."""
        while self.done < target:
            step = self.steps[self.done]
            self.done += 1
            if step.block is None:
                self.execute(step)  # fixtures and setup: an error there is every block's below
            elif step.block.runs and not (step.block.skip or step.block.covered):
                with contextlib.suppress(Exception):  # reported by that block's own test
                    self.execute(step)
        self.done = target + 1
        self.execute(self.steps[target])

    def _exec(self, code: str, first_line: int, name: str) -> None:
        # padded so that tracebacks give the line numbers of the Markdown file
        compiled = compile("\n" * (first_line - 1) + code, name, "exec")
        exec(compiled, self.module.__dict__)  # noqa: S102 - running the docs is the point

    def _shell(self, block: Block) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
        )
        res = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],  # noqa: S607 - bash from PATH
            cwd=self.directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert res.returncode == 0, (
            f"{block.id}: exit status {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )

    def close(self) -> None:
        while self.context.cleanups:
            self.context.cleanups.pop()()
        sys.modules.pop(self.module.__name__, None)


class Runs:
    """The pages being run in this session, by path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pages: dict[Path, PageRun] = {}

    def get(self, page: Path) -> PageRun:
        if page not in self.pages:
            directory = Path(tempfile.mkdtemp(prefix=page.stem + "-", dir=self.root))
            (directory / "examples").symlink_to(ROOT / "examples")
            name = "docs_" + re.sub(r"\W", "_", page.relative_to(ROOT).with_suffix("").as_posix())
            module = types.ModuleType(name)
            sys.modules[name] = module  # so that dataclasses and pickle find the page's classes
            self.pages[page] = PageRun(page, parse_page(page), directory, module)
        return self.pages[page]

    def close(self, page: Path | None = None) -> None:
        for key in [page] if page is not None else list(self.pages):
            run = self.pages.pop(key, None)
            if run is not None:
                run.close()
