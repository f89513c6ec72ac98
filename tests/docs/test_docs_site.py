"""The documentation site as built: no rendering defect, every public name, the home page's jobs.

The site is built once (``mkdocs build --strict``, as CI does) into a temporary directory and
read with tools/sitecheck.py's HTML parser.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tonumpy

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import mkdocs_hooks  # noqa: E402
import sitecheck  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    sitecheck.build(out)
    return out


def page_text(site: Path, page: str) -> str:
    return " ".join(sitecheck.parse((site / page).read_text()).text().split())


def test_built_site_has_no_rendering_defect(site: Path) -> None:
    """Every page passes every rule of the site check (CI runs the same check)."""
    problems = sitecheck.check_site(site)
    assert not problems, "\n".join(map(str, problems))


def _inventory(site: Path) -> dict[str, str]:
    from mkdocstrings import Inventory

    with (site / "objects.inv").open("rb") as f:
        return {name: item.uri for name, item in Inventory.parse_sphinx(f).items()}


def _resolve(identifier: str) -> object | None:
    import importlib

    parts = identifier.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return None
            obj = getattr(obj, name)
        return obj
    return None


PUBLIC = [name for name in tonumpy.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_documented(site: Path, name: str) -> None:
    """Each name of tonumpy.__all__ has its full documentation somewhere in the site."""
    obj = getattr(tonumpy, name)
    documented = [ident for ident in _inventory(site) if _resolve(ident) is obj]
    assert documented, f"tonumpy.{name} is not rendered on any page"


@pytest.mark.parametrize("name", tonumpy.__all__)
def test_api_page_lists_every_public_name_with_parameters(site: Path, name: str) -> None:
    """The API page's index names every public name, with its parameters (from the code)."""
    text = page_text(site, "api/index.html")
    obj = getattr(tonumpy, name)
    if name == "__version__":
        assert f"__version__ = {tonumpy.__version__!r}" in text
    elif inspect.isclass(obj) and not (
        issubclass(obj, BaseException) or "Args:" in (obj.__doc__ or "")
    ):
        # made by tonumpy, not by users: listed with its methods
        assert re.search(rf"\b{name}: ", text)
        for member, value in vars(obj).items():
            if not member.startswith("_") and callable(value) and value.__doc__:
                assert f".{member}" in text
    else:
        signature = name + mkdocs_hooks._parameters(obj)
        assert signature in text
        for parameter in inspect.signature(obj).parameters:
            assert parameter in signature


def test_home_page_shows_the_three_jobs(site: Path) -> None:
    """Model outputs, batched predictions and logging hooks, each with an example, and the figure
    against the peers (its file exists: the link check of the site check covers it)."""
    root = sitecheck.parse((site / "index.html").read_text())
    headings = [n.text().strip().rstrip("¶").strip() for n in root.iter() if n.tag == "h3"]
    assert headings[:3] == ["Model outputs", "Batched predictions", "Logging hooks"]
    html = (site / "index.html").read_text()
    for job, api in [
        ("model-outputs", "to_numpy"),
        ("batched-predictions", "Accumulator"),
        ("logging-hooks", "capture"),
    ]:
        section = html[html.index(f'id="{job}"') :]
        section = section[: section.find("<h", 10)]
        assert "<pre>" in section or 'class="highlight"' in section
        assert api in sitecheck.parse(section).text()
    images = [n.attrs.get("src", "") for n in root.iter() if n.tag == "img"]
    assert "img/peers.png" in images


def test_home_page_explains_its_chart_labels(site: Path) -> None:
    """Each workload label on the chart (W1-W6) is explained on the home page, in its own item."""
    root = sitecheck.parse((site / "index.html").read_text())
    labels = set(re.findall(r"\bW\d\b", root.text()))
    assert labels == {f"W{n}" for n in range(1, 7)}
    explained = {}
    for item in (n for n in root.iter() if n.tag == "li"):
        strong = next((c for c in item.children if getattr(c, "tag", "") == "strong"), None)
        if strong is not None and re.fullmatch(r"W\d", strong.text()):
            explained[strong.text()] = " ".join(item.text().split())
    assert set(explained) == labels
    assert all(len(text) > 40 for text in explained.values()), explained


def test_guides_do_not_tell_history_the_reader_never_saw() -> None:
    """Version 0.1.0 is the first release: a guide says what holds, the changelog what changed."""
    for page in (ROOT / "docs").rglob("*.md"):
        if page.name == "changelog.md":
            continue
        text = page.read_text()
        for phrase in ("before the first release", "used to match", "changed before"):
            assert phrase not in text, (page, phrase)


def test_404_page_links_are_relative(site: Path) -> None:
    """404.html works opened from files: its links to the site are relative (site check too)."""
    root = sitecheck.parse((site / "404.html").read_text())
    links = [n.attrs.get("href") or n.attrs.get("src") or "" for n in root.iter()]
    internal = [u for u in links if u and not re.match(r"[a-z]+:|//", u)]
    assert internal
    assert not [u for u in internal if u.startswith("/")]
    assert '"base": "/"' not in (site / "404.html").read_text()


def test_docs_test_comments_stay_hidden(site: Path) -> None:
    """The runner's <!-- docs-test: ... --> comments never show on a page."""
    for file in site.rglob("*.html"):
        assert "docs-test" not in sitecheck.parse(file.read_text()).text(), file


SNIPPET_LINE = re.compile(r"^[ \t]*-{1,2}\s*8\s*<\s*-{1,2}.*$", re.MULTILINE)


def _snippet_lines(text: str) -> list[str]:
    return SNIPPET_LINE.findall(text)


@pytest.mark.parametrize(
    "page",
    [p for p in sorted((ROOT / "docs").rglob("*.md")) if _snippet_lines(p.read_text())],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_snippet_markers_are_intact_and_survive_the_formatter(tmp_path: Path, page: Path) -> None:
    """Each ``--8<--`` line is well formed, names a file that exists, and ``ruff format`` leaves
    it alone (ruff formats the Python fences of Markdown files: inside ```` ```python ```` it
    rewrites the marker as ``--8 < --"..."``, so snippets use the ``{ .python }`` fence)."""
    lines = _snippet_lines(page.read_text())
    for line in lines:
        match = re.fullmatch(r'--8<-- "([^"]+)"', line.strip())
        assert match, f"malformed snippet marker {line!r}"
        assert (ROOT / match.group(1)).is_file(), line
    ruff = shutil.which("ruff") or pytest.fail("ruff is a dev dependency; it is not on PATH")
    copy = tmp_path / page.name
    shutil.copy(page, copy)
    res = subprocess.run(
        [ruff, "format", "--config", str(ROOT / "pyproject.toml"), str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert _snippet_lines(copy.read_text()) == lines
