"""docs/architecture.md is true: it names every module, and shows the contract CI checks."""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import tomllib

import tonumpy

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
PUBLIC_MODULES = [
    "tonumpy",
    "tonumpy.accumulate",
    "tonumpy.asynchronous",
    "tonumpy.cli",
    "tonumpy.convert",
    "tonumpy.distributed",
    "tonumpy.errors",
    "tonumpy.hooks",
    "tonumpy.io",
    "tonumpy.lightning",
    "tonumpy.table",
]


def _package_modules() -> set[str]:
    names = {"tonumpy"}
    for info in pkgutil.walk_packages(tonumpy.__path__, "tonumpy."):
        names.add(info.name)
    return names


def _table_modules() -> list[str]:
    section = PAGE[PAGE.index("## Modules") :]
    return re.findall(r"^\| `(tonumpy[\w.]*)` \|", section, flags=re.MULTILINE)


def _shown_contract() -> dict[str, object]:
    section = PAGE[PAGE.index("## The layers, checked") :]
    block = re.search(r"```toml\n(.*?)```", section, flags=re.DOTALL)
    assert block is not None, "the page shows no toml block under 'The layers, checked'"
    return tomllib.loads(block.group(1))["tool"]["importlinter"]


def test_every_module_of_the_package_is_named_once() -> None:
    """The module table names each module of src/tonumpy exactly once."""
    named = _table_modules()
    assert len(named) == len(set(named)), sorted(n for n in named if named.count(n) > 1)
    assert set(named) - _package_modules() == set(), "named but not in the package"
    assert _package_modules() - set(named) == set(), "in the package but not named"


def test_every_module_named_in_the_text_exists() -> None:
    """Each dotted private name the page gives (`_combine._columns`, `hooks._capturing`) exists."""
    short = {m.removeprefix("tonumpy.") for m in _package_modules()}
    for found in re.findall(r"`((?:_?[a-z]+\.)*_[a-z_]+|io\._[a-z_]+)`", PAGE):
        name = found.removeprefix("tonumpy.")
        if "." not in name or name in short:
            continue
        owner, attribute = name.rsplit(".", 1)
        assert owner in short, f"the page names {name!r}: {owner!r} is not a module"
        module = importlib.import_module(f"tonumpy.{owner}")
        assert hasattr(module, attribute), f"the page names {name!r}, which does not exist"


def test_the_contract_shown_is_the_contract_checked() -> None:
    """The import-linter contract on the page equals pyproject.toml's, option for option."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert _shown_contract() == pyproject["tool"]["importlinter"]


def test_every_layer_names_modules_of_the_package() -> None:
    """Every module in the layers contract exists, and every top-level module has a layer."""
    modules = _package_modules()
    contract = next(c for c in _shown_contract()["contracts"] if c["type"] == "layers")
    layered = {m.strip() for layer in contract["layers"] for m in re.split(r"[|:]", layer)}
    top = {m.split(".")[1] for m in modules if m.count(".") >= 1} - {"__main__", "_startup"}
    assert {f"tonumpy.{m}" for m in layered} <= modules
    assert top <= layered, sorted(top - layered)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_paths_still_import(name: str) -> None:
    """Each public import path (tonumpy.io, tonumpy.hooks, ...) imports and defines its __all__."""
    module = importlib.import_module(name)
    for public in getattr(module, "__all__", []):
        assert hasattr(module, public), f"{name}.{public}"


def test_every_public_name_of_the_package_resolves() -> None:
    """Every name in tonumpy.__all__ resolves, to the object its home module defines."""
    for name in tonumpy.__all__:
        assert getattr(tonumpy, name) is not None, name


def test_import_tonumpy_loads_no_torch() -> None:
    """`import tonumpy` alone imports neither torch nor the CLI's start-up hook."""
    import subprocess

    code = (
        "import sys, tonumpy; "
        "print(sorted(m for m in ('torch', 'numpy', 'tonumpy._startup', 'tonumpy.convert') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_public_modules_are_attributes_after_a_bare_import() -> None:
    """After only `import tonumpy`, tonumpy.io, tonumpy.asynchronous, ... are reachable as
    attributes (as they were when the root imported them eagerly), and the CLI's hook is not."""
    import subprocess

    names = ["accumulate", "asynchronous", "convert", "distributed", "hooks", "io", "table"]
    code = (
        "import sys, tonumpy; "
        f"mods = [getattr(tonumpy, n).__name__ for n in {names!r}]; "
        "print(mods, 'tonumpy._startup' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"{[f'tonumpy.{n}' for n in names]!r} False"
