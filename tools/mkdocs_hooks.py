"""MkDocs hooks (mkdocs.yml ``hooks:``): the API page's index of every public name; 404.html.

``docs/api.md`` holds the line ``<!-- public-names -->``; at build time it is replaced by a list of
every name in ``tonumpy.__all__``, grouped by topic, each with its parameters (names and
defaults, read with ``inspect.signature`` from the code being documented) and a
cross-reference to its full documentation, wherever in the site that is. A name that is not
rendered anywhere leaves its cross-reference as text: ``mkdocs build --strict`` does not notice
(autorefs leaves such a reference without a warning), tools/sitecheck.py does (broken-link).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

MARKER = "<!-- public-names -->"

# where a name is defined -> the topic it is listed under (a module not named here is listed
# under its own name)
TOPICS = {
    "tonumpy.convert": "Conversion",
    "tonumpy.asynchronous": "Device-to-host transfer",
    "tonumpy._convert._transfer": "Device-to-host transfer",
    "tonumpy.accumulate": "Batched predictions",
    "tonumpy.hooks": "Logging hooks",
    "tonumpy.hooks._activations": "Logging hooks",
    "tonumpy._numpy_args": "Logging hooks",
    "tonumpy.distributed": "Gathering across ranks",
    "tonumpy.io": "Files",
    "tonumpy.table": "Predictions at scale",
}
ERRORS = "Errors"


def _package(config: Any) -> ModuleType:
    """Import tonumpy from the checkout being documented (mkdocs.yml's directory / src)."""
    src = Path(config.config_file_path).resolve().parent / "src"
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    package = importlib.import_module("tonumpy")
    if src not in Path(package.__file__ or "").resolve().parents:
        msg = f"tonumpy was imported from {package.__file__}, not from {src}: stale import"
        raise RuntimeError(msg)
    return package


def _default(value: Any) -> str:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def _parameters(obj: Any) -> str:
    """``(a, /, *, b=1)``: parameter names, kinds and defaults, without annotations."""
    sig = inspect.signature(obj)
    out: list[str] = []
    star = slash = False
    params = list(sig.parameters.values())
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text, star = "*" + p.name, True
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + p.name
        if p.default is not p.empty:
            text += "=" + _default(p.default)
        out.append(text)
        last_positional = i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY
        if p.kind is p.POSITIONAL_ONLY and last_positional and not slash:
            out.append("/")
            slash = True
    return "(" + ", ".join(out) + ")"


_XREF = re.compile(r"\[(`[^`\]]+`)\]\[[^\]]*\]")


def _summary(obj: Any) -> str:
    """The first paragraph of the docstring, cross-references made plain code.

    They are relative to the docstring's own scope, which this page is not.
    """
    doc = inspect.getdoc(obj) or ""
    return _XREF.sub(r"\1", doc.strip().split("\n\n", 1)[0].replace("\n", " "))


def _ident(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _documented_members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties with a docstring of their own (what mkdocstrings shows)."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        func = value.fget if isinstance(value, property) else value
        if callable(func) and getattr(func, "__doc__", None):
            members.append((name, value))
    return members


def _entry(name: str, obj: Any) -> list[str]:
    if not (inspect.isclass(obj) or callable(obj)):
        return [f"- `{name}` = `{obj!r}`"]
    if inspect.isclass(obj):
        is_error = issubclass(obj, BaseException)
        public_init = is_error or "Args:" in (obj.__doc__ or "")
        # the name and its parameters as one code span, linked to the full documentation
        head = f"[`{name}{_parameters(obj) if public_init else ''}`][{_ident(obj)}]"
        if is_error:
            head += " (subclasses " + ", ".join(f"`{b.__name__}`" for b in obj.__bases__) + ")"
        lines = [f"- {head}: {_summary(obj)}"]
        for member, value in _documented_members(obj):
            target = f"{_ident(obj)}.{member}"
            if isinstance(value, property):
                lines.append(f"    - [`.{member}`][{target}] (property): {_summary(value)}")
            else:
                params = _parameters(value).replace("(self, ", "(").replace("(self)", "()")
                lines.append(f"    - [`.{member}{params}`][{target}]: {_summary(value)}")
        return lines
    return [f"- [`{name}{_parameters(obj)}`][{_ident(obj)}]: {_summary(obj)}"]


def public_names(package: ModuleType) -> str:
    """The Markdown list of every name in ``package.__all__``, grouped by topic."""
    groups: dict[str, list[str]] = {topic: [] for topic in (*dict.fromkeys(TOPICS.values()),)}
    groups[ERRORS] = []
    other: list[str] = []

    # functions first, then classes, within each topic; errors from the base class down
    def order(name: str) -> tuple[bool, int]:
        obj = getattr(package, name)
        return inspect.isclass(obj), len(obj.__mro__) if inspect.isclass(obj) else 0

    names = sorted(package.__all__, key=order)
    for name in names:
        obj = getattr(package, name)
        lines = _entry(name, obj)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            groups[ERRORS] += lines
        elif hasattr(obj, "__module__") and (callable(obj) or inspect.isclass(obj)):
            groups.setdefault(TOPICS.get(obj.__module__, obj.__module__), []).extend(lines)
        else:
            other += lines
    out = []
    for topic, lines in groups.items():
        if lines:
            out += [f"**{topic}**", "", *lines, ""]
    if other:
        out += ["**Other**", "", *other, ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    """Replace the marker of docs/api.md by the index of public names."""
    if page.file.src_uri != "api.md":
        return markdown
    if MARKER not in markdown:
        msg = f"docs/api.md lost its {MARKER} line: the index of public names has nowhere to go"
        raise RuntimeError(msg)
    return markdown.replace(MARKER, public_names(_package(config)))


def relative_404(html: str, base: str) -> str:
    """``404.html`` with its links to the site relative to the site's root, not root-absolute.

    MkDocs writes them from the root of ``site_url`` (``/`` without one), because the page is
    served for missing paths at any depth; those links break when the site is opened from files
    (``file://``) or served under another path. Relative links work from the site's root, where
    ``404.html`` is (and where a static host serves it for a missing top-level page).

    Examples:
        >>> relative_404('<a href="/cli/">x</a><link href="/."> {"base": "/"}', "/")
        '<a href="cli/">x</a><link href="."> {"base": "."}'
    """
    prefix = re.escape(base)

    def attribute(match: re.Match[str]) -> str:
        return f'{match.group(1)}="{match.group(2) or "."}"'

    html = re.sub(rf'\b(href|src)="{prefix}([^"]*)"', attribute, html)
    html = re.sub(rf'"base": "{prefix}"', '"base": "."', html)
    return re.sub(rf'"search": "{prefix}', '"search": "', html)


def on_post_template(output_content: str, *, template_name: str, config: Any) -> str:
    """Make the links of ``404.html`` relative (see [`relative_404`][])."""
    if template_name != "404.html":
        return output_content
    base = urlsplit(config.site_url or "/").path or "/"
    return relative_404(output_content, base if base.endswith("/") else base + "/")
