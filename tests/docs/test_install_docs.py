"""The install the docs describe is the one that works, and the one CI runs (``.ci/run``)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

import tonumpy

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block, comments and blank lines left out."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [
        [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
        for block in blocks
    ]


def test_no_page_installs_a_distribution_that_is_not_published() -> None:
    """tonumpy is not on PyPI: ``pip install tonumpy`` and ``tonumpy[extra]`` both fail."""
    published = re.compile(r"pip install\s+[\"']?tonumpy\b")
    for page in PAGES:
        text = page.read_text()
        assert not published.search(text), page
        assert not re.search(r"[\"'\s`]tonumpy\[\w+\]", text), page


def test_the_documented_wheel_install_is_what_ci_runs() -> None:
    """Every command of the wheel block of Getting started runs in .ci/run's fresh venv."""
    blocks = bash_blocks((ROOT / "docs" / "getting-started.md").read_text())
    wheel = next(block for block in blocks if any("python -m build" in c for c in block))
    ci = (ROOT / ".ci" / "run").read_text().replace("$version", tonumpy.__version__)
    ci = ci.replace(" -q ", " ").replace('--outdir "$install_dir/dist" .', "")
    for command in wheel:
        assert command.strip() in ci, command
    assert f"dist/tonumpy-{tonumpy.__version__}-py3-none-any.whl" in " ".join(wheel)
    clone = next(block for block in blocks if "pip install ." in block)
    assert clone[:2] == [
        "python3 -m venv .venv && . .venv/bin/activate",
        "pip install torch==2.13.0",
    ]  # torch pinned first, as in README's first command and in CI


def test_build_is_in_the_dev_extra() -> None:
    """The dev extra holds `build`, which the documented wheel install needs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("build") for req in project["optional-dependencies"]["dev"])
