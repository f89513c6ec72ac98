"""The site checker (tools/sitecheck.py) fails each deliberately broken page and passes clean ones.

The broken pages are made the way the real ones were: Markdown rendered by Python-Markdown with
the extensions of mkdocs.yml, so each case is a defect the toolchain really produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

import markdown
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import sitecheck  # noqa: E402

EXTENSIONS = ["admonition", "pymdownx.highlight", "pymdownx.superfences", "tables", "toc"]


def html_page(body: str) -> str:
    return f"<!doctype html>\n<html><head><title>t</title></head>\n<body>\n{body}\n</body></html>\n"


def render(md: str) -> str:
    return html_page(markdown.markdown(md, extensions=EXTENSIONS))


def write_site(root: Path, pages: dict[str, str]) -> Path:
    for name, html in pages.items():
        file = root / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(html)
    return root


def rules_of(site: Path) -> list[str]:
    return [p.rule for p in sitecheck.check_site(site)]


# (rule, Markdown or HTML that breaks it): each is what a real mistake renders to
BROKEN = {
    "doctest lines read as blockquotes": (
        "prompt-blockquote",
        render("Examples:\n>>> x = to_numpy(t)\n>>> x\narray([1.], dtype=float32)"),
    ),
    "a comparison at the start of a line": (
        "prompt-blockquote",
        render("The targets are:\n>= 10x over naive on 10,000 leaves."),
    ),
    "a number after '> '": ("prompt-blockquote", render("Speed-up:\n> 10x on small leaves.")),
    "an escaped prompt in prose": (
        "example-outside-code",
        render("Run it:\n\\>>> tonumpy.to_numpy(t)\narray([1.], dtype=float32)"),
    ),
    "a continuation prompt in a table cell": (
        "example-outside-code",
        render("| call | result |\n| --- | --- |\n| f( | x |\n| ... y) | z |"),
    ),
    "a class role": ("sphinx-role", render("Raises :class:`ConversionError` on bad input.")),
    "a func role inside a link": ("sphinx-role", render("See [:func:`to_numpy`](#x).")),
    "a meth role in a list": ("sphinx-role", render("- then :meth:`Accumulator.result`")),
    "a mangled snippet marker": (
        "snippet-marker",
        render('```python\n--8 < --"examples/gather_torchrun.py"\n```'),
    ),
    "an unprocessed snippet marker": (
        "snippet-marker",
        render('```python\n--8<-- "examples/gather_torchrun.py"\n```'),
    ),
    "a snippet marker with en dashes in prose": (
        "snippet-marker",
        html_page('<p>\u20138<\u2013 "examples/x.py"</p>'),
    ),
    "a cross-reference whose target is missing": (
        "broken-link",
        render("What [`capture`][] captured, as [the guide][guide] says."),
    ),
    "an empty fenced block": ("empty-code", render("Before.\n\n```python\n```\n\nAfter.")),
    "an empty code span": ("empty-code", html_page("<p>call <code> </code> now</p>")),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_rule_fails_its_broken_page(tmp_path: Path, case: str) -> None:
    """Each sitecheck rule reports the page built to break it."""
    rule, html = BROKEN[case]
    site = write_site(tmp_path, {"index.html": html})
    assert rule in rules_of(site)


LINKS = {
    "a missing page": ('<a href="missing/">x</a>', "no file"),
    "a missing Markdown source": ('<a href="guide.md">x</a>', "no file"),
    "a missing anchor on another page": ('<a href="other/#nowhere">x</a>', "no anchor"),
    "a missing anchor on this page": ('<a href="#nowhere">x</a>', "no anchor"),
    "a missing image": ('<img src="img/none.png" alt="">', "no file"),
    "a missing stylesheet": ('<link rel="stylesheet" href="assets/none.css">', "no file"),
    "a link out of the site": ('<a href="../../etc/passwd">x</a>', "outside the site"),
}


@pytest.mark.parametrize("case", list(LINKS))
def test_broken_internal_links_fail(tmp_path: Path, case: str) -> None:
    """Links to missing pages or anchors inside the site are reported."""
    tag, why = LINKS[case]
    site = write_site(
        tmp_path,
        {
            "index.html": html_page(f'<h1 id="top">t</h1><p>{tag}</p>'),
            "other/index.html": html_page('<h2 id="there">there</h2>'),
        },
    )
    problems = sitecheck.check_site(site)
    assert [p.rule for p in problems] == ["broken-link"]
    assert why in problems[0].detail
    assert problems[0].page == "index.html"


CLEAN_MD = """\
# A clean page

> Tensors are converted where they are: a real quotation starts with words.

```python
>>> import torch, tonumpy
>>> tonumpy.to_numpy(torch.ones(1))
array([1.], dtype=float32)
```

Prompts in a code span are fine: `>>>` and `...`; so is role text in one: `:func:`, and
brackets: `acts["x"][-1]`, `[a][b]`.
A comparison inside a line is fine: speed-ups >= 10x, ratios <= 1.25.

```rst
Sphinx itself writes :func:`to_numpy`.
```

| a | b |
| --- | --- |
| 1 | 2 |

See [the other page](other/index.html#there), [this section](#a-clean-page),
[the top](other/), [the web](https://example.org/#x), [protocol-relative](//example.org/) and
![a figure](img/fig.png).

```text
a line of exactly eighty characters, as wide as the theme shows without clipping
```
"""


def test_a_clean_page_passes(tmp_path: Path) -> None:
    """A page with valid links, images and code blocks gives no problem."""
    site = write_site(
        tmp_path,
        {
            "index.html": render(CLEAN_MD),
            "other/index.html": html_page('<h2 id="there">there</h2>'),
        },
    )
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "fig.png").write_bytes(b"\x89PNG")
    assert sitecheck.check_site(site) == []


def test_problems_name_page_and_line(tmp_path: Path) -> None:
    """A problem names its page and the line of the rendered HTML."""
    site = write_site(tmp_path, {"guide/index.html": render("text\n\nUse :func:`f`.")})
    (problem,) = sitecheck.check_site(site)
    assert problem.page == "guide/index.html"
    assert problem.line > 1
    assert str(problem).startswith(f"guide/index.html:{problem.line}: [sphinx-role]")


def test_a_directory_without_pages_is_an_error(tmp_path: Path) -> None:
    """A site directory with no HTML pages is itself reported."""
    assert rules_of(tmp_path) == ["no-pages"]


def test_cli_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sitecheck exits 0 on a clean site, 1 with problems printed, and refuses no arguments."""
    clean = write_site(tmp_path / "clean", {"index.html": render("# Fine\n\nAll good.")})
    broken = write_site(tmp_path / "broken", {"index.html": render("x\n>>> y")})
    assert sitecheck.main([str(clean)]) == 0
    assert sitecheck.main([str(broken)]) == 1
    out = capsys.readouterr().out
    assert "[prompt-blockquote]" in out
    with pytest.raises(SystemExit):
        sitecheck.main([])  # neither a site nor --build


def test_parser_keeps_structure() -> None:
    """The HTML parser keeps nesting and text through void and stray closing tags."""
    root = sitecheck.parse("<div><p>a<br>b<img src=x></p><p>c</span></p></div>")
    (div,) = [n for n in root.iter() if n.tag == "div"]
    assert [c.tag for c in div.children if isinstance(c, sitecheck.Node)] == ["p", "p"]
    assert div.text() == "abc"


# --------------------------------------------------------- links and code as the theme shows them


def test_root_absolute_links_fail_even_when_the_file_exists(tmp_path: Path) -> None:
    """As 404.html without site_url: /assets/... works from a server's root, nowhere else."""
    page = html_page(
        '<link rel="stylesheet" href="/assets/main.css"><a href="/other/">other</a>'
        '<script src="/assets/app.js"></script><a href="other/">relative</a>'
    )
    site = write_site(
        tmp_path,
        {"404.html": page, "other/index.html": html_page("<p>x</p>"), "assets/main.css": ""},
    )
    (tmp_path / "assets" / "app.js").write_text("")
    problems = sitecheck.check_site(site)
    assert [p.rule for p in problems] == ["root-absolute-link"] * 3
    assert all(p.page == "404.html" and "file://" in p.detail for p in problems)


LONG = "tonumpy: error: out.pickle: cannot write '.pickle' files; the destination must end in .npz"


def code_site(root: Path, css: str | None) -> Path:
    head = '<link rel="stylesheet" href="../assets/extra.css">' if css is not None else ""
    page = f"<!doctype html><html><head>{head}</head><body><pre><code>{LONG}</code></pre>"
    site = write_site(root, {"guide/index.html": page + "</body></html>"})
    if css is not None:
        write_site(root, {"assets/extra.css": css})
    return site


def test_long_code_lines_fail_unless_code_blocks_wrap(tmp_path: Path) -> None:
    """Code lines wider than the page are reported unless the theme wraps code on screen."""
    assert len(LONG) > sitecheck.CODE_COLUMNS
    (problem,) = sitecheck.check_site(code_site(tmp_path / "plain", None))
    assert problem.rule == "clipped-code"
    assert f"{len(LONG)} characters" in problem.detail
    # the theme's own rule wraps only when printing: still clipped on screen
    printing = "@media print{.md-typeset pre{white-space:pre-wrap}}"
    assert rules_of(code_site(tmp_path / "print", printing)) == ["clipped-code"]
    scrolls = ".md-typeset pre>code{overflow:auto;white-space:pre}"
    assert rules_of(code_site(tmp_path / "scroll", scrolls)) == ["clipped-code"]
    wraps = "/* wrap */\n.md-typeset pre > code {\n  white-space: pre-wrap;\n}"
    assert rules_of(code_site(tmp_path / "wraps", wraps)) == []


def test_404_links_are_made_relative() -> None:
    """The hook that rewrites 404.html: links from the site's root, whatever site_url's path."""
    import mkdocs_hooks

    html = (
        '<link href="/docs/assets/main.css"><a href="/docs/">home</a>'
        '<a href="https://example.org/docs/">web</a>'
        '{"base": "/docs/", "search": "/docs/assets/search.js"}'
    )
    assert mkdocs_hooks.relative_404(html, "/docs/") == (
        '<link href="assets/main.css"><a href=".">home</a>'
        '<a href="https://example.org/docs/">web</a>'
        '{"base": ".", "search": "assets/search.js"}'
    )
