"""Check the documentation site as rendered: the HTML that readers get, not the Markdown.

``mkdocs build --strict`` proves that the sources build; this module reads every HTML page of the
built site with a real HTML parser (the standard library's ``html.parser``) and reports what
renders wrong there, however it got there (a docstring, a formatter, a generated table, a theme):

``prompt-blockquote``
    a blockquote made of ``>`` prompts or comparison signs: a Markdown line that starts with
    ``>>>``, ``>=`` or ``> 10x`` becomes a (nested) blockquote. A blockquote whose text starts
    with ``=``, ``>``, ``<``, a digit or another blockquote is one of those; a real quotation
    starts with words.
``example-outside-code``
    a line of a docstring example (``>>>`` anywhere, or a line starting with a ``...`` prompt)
    in text that is not inside a code block or code span.
``sphinx-role``
    Sphinx role text such as ``:class:`` or ``:func:`` followed by code, outside code blocks:
    Markdown renders roles literally (use ``[`name`][]`` cross-references instead).
``snippet-marker``
    a ``--8<--`` snippet marker in any mangled form (``--8 < --``, en dashes, split over
    highlighting spans), anywhere: the snippet was not included.
``empty-code``
    a code block (``<pre>``) or a code span with nothing in it.
``broken-link``
    a reference-style link or cross-reference left as text (``[`name`][]``: its target was not
    found), or an internal link (``<a href>``, ``<img src>``, ``<link href>``, ``<script src>``)
    to a file that is not in the site, or to an anchor that the target page does not have. Links
    with a scheme (``https:``, ``mailto:``) or starting with ``//`` are external, not checked.
``root-absolute-link``
    an internal link that starts with ``/`` (``href="/assets/main.css"``, as MkDocs writes in
    ``404.html`` without ``site_url``): it resolves against the host's root, so it breaks when the
    site is opened from files (``file://``) or served under a sub-path. Relative links work in
    both.
``clipped-code``
    a line of a code block longer than the theme shows at its widest layout
    (``CODE_COLUMNS`` characters), on a page whose stylesheets do not wrap code blocks
    (``white-space: pre-wrap`` or ``break-spaces`` for ``pre``/``pre > code``, outside
    ``@media print``): the end of the line is cut off behind a scrollbar. Wrap code blocks in
    the site's CSS, or break the line in the source.

Not checked (a rule cannot tell): whether a label in a chart or table (``W1``) is explained on
the page that shows it; ``tests/docs/test_docs_site.py`` checks the home page's labels by name.

Command line (from the repository root, the project's environment active)::

    python tools/sitecheck.py SITE_DIR     # check a site built with mkdocs build --site-dir
    python tools/sitecheck.py --build      # build it (--strict, a temporary dir), then check

Exit status 0 when the site is clean, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import functools
import posixpath
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["Page", "Problem", "build", "check_page", "check_site", "main", "parse"]

# Elements that never have children or an end tag (HTML "void elements").
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source"}
    | {"track", "wbr"}
)
# Phrasing elements: their text belongs to the block around them.
_INLINE = frozenset(
    {"a", "abbr", "b", "bdi", "bdo", "br", "cite", "code", "data", "del", "dfn", "em", "i", "img"}
    | {"input", "ins", "kbd", "label", "mark", "q", "s", "samp", "small", "span", "strong", "sub"}
    | {"sup", "time", "u", "var", "wbr"}
)

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const|ref|doc|term|any|envvar|option"
    r"|program|samp|file|kbd|math|abbr|numref|download|pep|rfc|keyword|token|command):[`\x01]"
)
_CODE_SPAN = re.compile(r"\x01[^\x02]*\x02")
_NUMBERED = re.compile(r"\x01(\d+)\x02")
_REFERENCE = re.compile(r"\[[^\[\]\n]+\]\[[^\[\]\n]*\]")
_SNIPPET = re.compile(r"(?:--|[\u2013\u2014])\s*8\s*<\s*(?:--|[\u2013\u2014])")
_PROMPT_LINE = re.compile(r"^\s*(?:>>>|\.\.\.(?:\s|$))", re.MULTILINE)
_QUOTE_START = re.compile(r"^\s*[=<>0-9]")
#: Characters of a code line that mkdocs-material shows without scrolling at its widest layout:
#: a content column of about 690 px (61rem grid less both sidebars and padding, at 20 px/rem)
#: over 13.6 px Roboto Mono (0.6 em a character, 8.2 px) is 84, less the block's padding.
CODE_COLUMNS = 80
_CSS_RULE = re.compile(r"([^{}]+)\{([^{}]*)\}")
_WRAPS = re.compile(r"white-space\s*:\s*(?:pre-wrap|break-spaces)")


@dataclass
class Node:
    """One element of a parsed page: its tag, attributes, and children (elements or text)."""

    tag: str
    attrs: dict[str, str]
    line: int
    children: list[Node | str] = field(default_factory=list)

    def iter(self) -> Iterator[Node]:
        """This element and every element below it, in document order."""
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def text(self) -> str:
        """All text below this element, concatenated."""
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, 1)
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.getpos()[0])
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}, self.getpos()[0]))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return
        # an end tag without a start tag: ignored, as browsers do

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    """Parse an HTML document into a tree of `Node`s (comments and doctypes are dropped)."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


@dataclass(frozen=True)
class Problem:
    """One rendering defect: where it is, which rule it breaks, and what was seen."""

    page: str
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: [{self.rule}] {self.detail}"


@dataclass
class Page:
    """A parsed page of the site, with the anchors it defines."""

    path: str  # relative to the site root, with "/" separators
    root: Node
    ids: set[str]

    @classmethod
    def read(cls, site: Path, file: Path) -> Page:
        """Parse ``file``, a page of the site rooted at ``site``."""
        root = parse(file.read_text(encoding="utf-8"))
        ids = {n.attrs[k] for n in root.iter() for k in ("id", "name") if k in n.attrs}
        return cls(file.relative_to(site).as_posix(), root, ids)


def _show(text: str) -> str:
    """Code spans as they were written: `code`."""
    return text.replace("\x01", "`").replace("\x02", "`")


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _inline_text(node: Node, *, code: bool) -> str:
    r"""The text of ``node``'s own inline content, nested blocks as line breaks.

    Code spans are kept between \x01 and \x02 (``code=True``) or left out (prose only).
    """
    out = []
    for child in node.children:
        if isinstance(child, str):
            out.append(child)
        elif child.tag in ("code", "kbd", "samp"):
            out.append(f"\x01{child.text()}\x02" if code else " ")
        elif child.tag in _INLINE:
            out.append(_inline_text(child, code=code))
        else:
            out.append("\n")
    return "".join(out)


def _blocks(root: Node) -> Iterator[Node]:
    """Every block-level element (each text run belongs to exactly one), scripts left out."""
    for node in root.iter():
        if node.tag not in _INLINE and node.tag not in ("script", "style", "template"):
            yield node


Finding = tuple[Node, str]  # where (an element) and what was seen
_RULES: dict[str, Callable[[Page], Iterator[Finding]]] = {}


def _rule(name: str) -> Callable[[Callable[[Page], Iterator[Finding]]], Any]:
    def register(fn: Callable[[Page], Iterator[Finding]]) -> Callable[[Page], Iterator[Finding]]:
        _RULES[name] = fn
        return fn

    return register


def _prose_blocks(page: Page, *, code: bool) -> Iterator[tuple[Node, str]]:
    """Every block but code blocks, with its inline text (see `_inline_text`)."""
    for node in _blocks(page.root):
        if node.tag != "pre":
            yield node, _inline_text(node, code=code)


def _mask_code(text: str) -> tuple[str, list[str]]:
    r"""``text`` with each code span replaced by its number (\x01N\x02), and the spans."""
    parts, codes = _CODE_SPAN.split(text), _CODE_SPAN.findall(text)
    masked = "".join(p + (f"\x01{i}\x02" if i < len(codes) else "") for i, p in enumerate(parts))
    return masked, codes


def _unmask(text: str, codes: list[str]) -> str:
    """Masked text as it was written, code spans in backticks (a cut-off number: `...`)."""
    text = _NUMBERED.sub(lambda m: _show(codes[int(m.group(1))]), text)
    return _show(re.sub(r"\x01\d*$|^\d*\x02", "`...`", text))


def _around(text: str, match: re.Match[str], before: int = 30, after: int = 40) -> str:
    return _short(_show(text[max(0, match.start() - before) : match.end() + after]))


@_rule("prompt-blockquote")
def _prompt_blockquotes(page: Page) -> Iterator[Finding]:
    for node in page.root.iter():
        if node.tag != "blockquote":
            continue
        first = next((c for c in node.children if not (isinstance(c, str) and not c.strip())), "")
        if isinstance(first, Node) and first.tag == "blockquote":
            yield node, f"nested blockquote (a '>>' or '>>>' line?): {_short(node.text())!r}"
        elif _QUOTE_START.match(node.text()):
            yield node, f"blockquote starting with a comparison or prompt: {_short(node.text())!r}"


@_rule("example-outside-code")
def _examples_outside_code(page: Page) -> Iterator[Finding]:
    for node, text in _prose_blocks(page, code=False):
        for match in _PROMPT_LINE.finditer(text):
            line = text[match.start() :].split("\n", 1)[0]
            yield node, f"example prompt outside a code block, in <{node.tag}>: {_short(line)!r}"


@_rule("sphinx-role")
def _sphinx_roles(page: Page) -> Iterator[Finding]:
    for node, text in _prose_blocks(page, code=True):
        # role text in prose, followed by a code span (how :func:`x` renders) or a backtick;
        # code spans are masked, so a role written inside one is fine
        masked, codes = _mask_code(text)
        for match in _ROLE.finditer(masked):
            context = _unmask(masked[max(0, match.start() - 30) : match.end() + 40], codes)
            yield node, f"Sphinx role rendered as text: {_short(context)!r}"


@_rule("snippet-marker")
def _snippet_markers(page: Page) -> Iterator[Finding]:
    for node in _blocks(page.root):
        # a <pre>'s whole text, so that a marker split over highlighting spans is seen whole
        text = node.text() if node.tag == "pre" else _inline_text(node, code=True)
        for match in _SNIPPET.finditer(text):
            marker = _around(text, match, 10, 50)
            yield node, f"unresolved snippet marker in <{node.tag}>: {marker!r}"


@_rule("empty-code")
def _empty_code(page: Page) -> Iterator[Finding]:
    def walk(node: Node) -> Iterator[Finding]:
        if node.tag in {"pre", "code"}:
            if not node.text().strip():
                yield node, "empty code block" if node.tag == "pre" else "empty code span"
            return  # a <code> inside a <pre> is the block itself
        for child in node.children:
            if isinstance(child, Node):
                yield from walk(child)

    yield from walk(page.root)


@_rule("broken-link")
def _unresolved_references(page: Page) -> Iterator[Finding]:
    for node, text in _prose_blocks(page, code=True):
        masked, codes = _mask_code(text)  # brackets inside code (x[0][1]) are not links
        for match in _REFERENCE.finditer(masked):
            shown = _unmask(match.group(), codes)
            yield node, f"reference left as text (target not found): {_short(shown)!r}"


_LINK_ATTRS = {"a": "href", "img": "src", "link": "href", "script": "src"}


def _links(page: Page, pages: dict[str, Page], site: Path) -> Iterator[Finding]:
    for node in page.root.iter():
        attr = _LINK_ATTRS.get(node.tag)
        if attr is None or attr not in node.attrs:
            continue
        url = node.attrs[attr].strip()
        if not url or url.startswith("//") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url):
            continue
        parts = urlsplit(url)
        target = page.path
        if parts.path.startswith("/"):
            yield (
                node,
                (
                    f"{url!r} is root-absolute: it breaks when the site is opened from files "
                    "(file://) or served under a sub-path; make it relative"
                ),
            )
        if parts.path:
            base = "" if parts.path.startswith("/") else posixpath.dirname(page.path)
            target = posixpath.normpath(posixpath.join(base, unquote(parts.path).lstrip("/")))
            if target == ".." or target.startswith("../"):
                yield node, f"{url!r} points outside the site"
                continue
            if (site / target).is_dir() or parts.path.endswith("/"):
                target = posixpath.join(target, "index.html").removeprefix("./")
            if not (site / target).is_file():
                yield node, f"{url!r}: no file {target!r} in the site"
                continue
        anchor = unquote(parts.fragment)
        if anchor and target in pages and anchor not in pages[target].ids:
            yield node, f"{url!r}: page {target!r} has no anchor {anchor!r}"


def _without_print(css: str) -> str:
    """A stylesheet without its ``@media print { ... }`` blocks (they do not apply on screen)."""
    out, i = [], 0
    for match in re.finditer(r"@media\s+print\s*\{", css):
        if match.start() < i:
            continue
        out.append(css[i : match.start()])
        depth, j = 1, match.end()
        while j < len(css) and depth:
            depth += {"{": 1, "}": -1}.get(css[j], 0)
            j += 1
        i = j
    out.append(css[i:])
    return "".join(out)


@functools.lru_cache(maxsize=64)
def _css_wraps_code(file: Path) -> bool:
    """Whether a stylesheet makes code blocks wrap on screen."""
    try:
        css = _without_print(file.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.DOTALL)
    return any(
        re.search(r"\bpre\b", selector) and _WRAPS.search(body)
        for selector, body in _CSS_RULE.findall(css)
    )


def _code_wraps(page: Page, site: Path) -> bool:
    for node in page.root.iter():
        if node.tag != "link" or "stylesheet" not in node.attrs.get("rel", "").split():
            continue
        href = urlsplit(node.attrs.get("href", "")).path
        if not href or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:|//", node.attrs.get("href", "")):
            continue
        base = "" if href.startswith("/") else posixpath.dirname(page.path)
        target = posixpath.normpath(posixpath.join(base, unquote(href).lstrip("/")))
        if _css_wraps_code(site / target):
            return True
    return False


def _clipped_code(page: Page, site: Path) -> Iterator[Finding]:
    long_lines = [
        (node, line)
        for node in page.root.iter()
        if node.tag == "pre"
        for line in node.text().split("\n")
        if len(line.rstrip()) > CODE_COLUMNS
    ]
    if not long_lines or _code_wraps(page, site):
        return
    for node, line in long_lines:
        yield (
            node,
            (
                f"a code line of {len(line.rstrip())} characters (more than {CODE_COLUMNS} are cut "
                f"off, and code blocks do not wrap): {_short(line, 60)!r}"
            ),
        )


def check_page(page: Page, pages: dict[str, Page], site: Path) -> list[Problem]:
    """Every problem on one page (``pages``: all pages of the site, by path, for anchors)."""
    found = [(name, f) for name, rule in _RULES.items() for f in rule(page)]
    for finding in _links(page, pages, site):
        root_absolute = "is root-absolute" in finding[1]
        found.append(("root-absolute-link" if root_absolute else "broken-link", finding))
    found += [("clipped-code", f) for f in _clipped_code(page, site)]
    return [Problem(page.path, node.line, name, detail) for name, (node, detail) in found]


def check_site(site: Path) -> list[Problem]:
    """Parse every HTML page under ``site`` and return every problem found, page by page."""
    site = Path(site)
    files = sorted(site.rglob("*.html"))
    if not files:
        return [Problem(str(site), 0, "no-pages", "no HTML page found: is this a built site?")]
    pages = {p.path: p for p in (Page.read(site, f) for f in files)}
    return [problem for page in pages.values() for problem in check_page(page, pages, site)]


def build(site: Path, *, root: Path | None = None) -> None:
    """Build the documentation into ``site`` with ``mkdocs build --strict``."""
    root = root or Path(__file__).resolve().parent.parent
    subprocess.run(  # noqa: S603 - fixed command line
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=root,
        check=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: check a built site, or build one and check it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", nargs="?", type=Path, help="a site built by mkdocs build")
    parser.add_argument(
        "--build",
        action="store_true",
        help="build the site (mkdocs build --strict) into a temporary directory",
    )
    args = parser.parse_args(argv)
    if args.build == (args.site is not None):
        parser.error("give either SITE or --build")
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site
        if args.build:
            site = Path(tmp) / "site"
            build(site)
        problems = check_site(site)
        pages = len(list(Path(site).rglob("*.html")))
    for problem in problems:
        print(problem)
    print(f"{pages} pages checked, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
