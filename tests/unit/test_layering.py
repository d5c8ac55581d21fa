"""The layering of the package, checked from its source (``docs/design.md`` draws it).

Every ``import`` and ``from ... import`` of every module is read with ``ast``,
at any depth (imports inside functions count: a deferred import is still a
dependency), and relative imports are resolved. The contracts:

* the kernel adapters (``markrouted.kernel.*``) import, of markrouted, only
  ``markrouted.model`` and each other;
* the pure core does no I/O: no sockets (the ``AF_INET``/``AF_INET6``
  constants aside), processes, ctypes, threads, event loops, clocks, logging,
  pyroute2, nftables or systemd, and none of the modules that do; only
  ``config`` may touch the file system, to read the config file;
* only ``markrouted.kernel`` imports pyroute2 or nftables;
* nothing imports ``markrouted.cli`` (``python3 -m markrouted`` aside);
* dependencies point one way: cli -> daemon -> reconcile ->
  {derive, diff, kernel} -> model, each module at its level of ``LEVELS``.

The checker itself is tested on small made-up packages, so a contract that
can no longer fail does not pass unnoticed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "markrouted"

#: The pure core: functions from values to values.
PURE = ("markrouted.model", "markrouted.config", "markrouted.nftexpr", "markrouted.derive",
        "markrouted.diff", "markrouted.health", "markrouted.explain", "markrouted.collisions")
#: What a pure module may not import (top-level names of the standard library and others).
IO_MODULES = ("socket", "subprocess", "ctypes", "asyncio", "threading", "concurrent", "multiprocessing",
              "select", "selectors", "signal", "time", "logging", "tempfile", "shutil", "http", "urllib",
              "pyroute2", "nftables", "systemd", "structlog")
#: Of the socket module, the pure core uses address-family numbers, nothing that opens a socket.
SOCKET_CONSTANTS = frozenset({"AF_INET", "AF_INET6"})
#: The file system: only config's ``load`` reads (the config file).
FILE_IO = {"os": ("markrouted.config",)}
#: markrouted's own modules that do I/O, which the pure core may not reach through.
IO_PACKAGE = ("markrouted.kernel", "markrouted.daemon", "markrouted.reconcile", "markrouted.monitor",
              "markrouted.status", "markrouted.log", "markrouted.cli", "markrouted.__main__",
              "markrouted.hooks", "markrouted.metrics")
KERNEL_LIBRARIES = ("pyroute2", "nftables")

#: Who may import whom: a module imports only modules of a lower level (and,
#: inside one package such as markrouted.kernel, its siblings). A new module
#: gets its level here, which is where it is placed on the map.
LEVELS: Mapping[str, int] = {
    "markrouted": 0,  # the version string
    "markrouted.model": 0,
    "markrouted.text": 0,  # quoting user text for messages
    "markrouted.sets": 0,  # set files: parsing, merging prefixes (imports nothing of markrouted)
    "markrouted.config": 1,
    "markrouted.nftexpr": 1,
    "markrouted.health": 2,
    "markrouted.explain": 2,
    "markrouted.collisions": 2,
    "markrouted.derive": 3,
    "markrouted.diff": 3,
    "markrouted.kernel": 3,
    "markrouted.reconcile": 4,
    "markrouted.status": 4,
    "markrouted.log": 4,
    "markrouted.monitor": 5,
    "markrouted.hooks": 5,  # running the hook programs
    "markrouted.metrics": 5,  # the Prometheus endpoint
    "markrouted.daemon": 6,
    "markrouted.cli": 7,
    "markrouted.__main__": 8,
}
#: Packages whose modules may import each other freely.
PACKAGES = ("markrouted.kernel", "markrouted.daemon")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # the imported module, absolute
    names: tuple[str, ...]  # for "from X import a, b": a, b
    line: int

    def __str__(self) -> str:
        what = f"from {self.target} import {', '.join(self.names)}" if self.names else f"import {self.target}"
        return f"{self.importer}:{self.line}: {what}"


@dataclass(frozen=True)
class Module:
    name: str
    tree: ast.Module
    imports: tuple[Import, ...]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    package = parts[-1] == "__init__"
    if package:
        parts.pop()
    return ".".join(parts), package


def _imports(name: str, package: bool, tree: ast.Module, known: set[str]) -> tuple[Import, ...]:
    here = name if package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(Import(name, alias.name, (), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            plain = []
            for alias in node.names:
                # "from . import nftexpr": the submodule is what is imported
                if f"{source}.{alias.name}" in known:
                    out.append(Import(name, f"{source}.{alias.name}", (), node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                out.append(Import(name, source, tuple(plain), node.lineno))
    return tuple(out)


def scan(root: Path) -> dict[str, Module]:
    """Every module of the package at ``root``, with its imports."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        name, package = _module_name(path, root)
        files[name] = (path, package)
    modules = {}
    for name, (path, package) in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        modules[name] = Module(name, tree, _imports(name, package, tree, set(files)))
    return modules


def _all_imports(modules: Mapping[str, Module]) -> Iterable[Import]:
    for module in modules.values():
        yield from module.imports


# ------------------------------------------------------------------ contracts


def kernel_violations(modules: Mapping[str, Module]) -> list[str]:
    return [
        f"{imp}: the kernel package imports only markrouted.model and its own modules"
        for imp in _all_imports(modules)
        if within(imp.importer, "markrouted.kernel") and within(imp.target, "markrouted")
        and not (within(imp.target, "markrouted.kernel") or imp.target == "markrouted.model")
    ]


def _socket_attributes(tree: ast.Module) -> set[str]:
    return {
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "socket"
    }


def io_violations(modules: Mapping[str, Module], pure: Iterable[str] = PURE) -> list[str]:
    out = []
    for name in pure:
        module = modules[name]
        for imp in module.imports:
            top = imp.target.split(".")[0]
            if top == "socket":
                used = set(imp.names) if imp.names else _socket_attributes(module.tree)
                if used - SOCKET_CONSTANTS:
                    out.append(f"{imp}: the pure core uses socket only for {sorted(SOCKET_CONSTANTS)}, "
                               f"not {sorted(used - SOCKET_CONSTANTS)}")
            elif top in IO_MODULES:
                out.append(f"{imp}: the pure core does no I/O")
            elif top in FILE_IO and name not in FILE_IO[top]:
                out.append(f"{imp}: of the pure core only {', '.join(FILE_IO[top])} reads files")
            elif any(within(imp.target, p) for p in IO_PACKAGE):
                out.append(f"{imp}: the pure core does not reach I/O through markrouted's own modules")
    return out


def library_violations(modules: Mapping[str, Module]) -> list[str]:
    return [
        f"{imp}: only markrouted.kernel imports {imp.target.split('.')[0]}"
        for imp in _all_imports(modules)
        if imp.target.split(".")[0] in KERNEL_LIBRARIES and not within(imp.importer, "markrouted.kernel")
    ]


def cli_violations(modules: Mapping[str, Module]) -> list[str]:
    return [
        f"{imp}: nothing imports the command line"
        for imp in _all_imports(modules)
        if within(imp.target, "markrouted.cli") and imp.importer not in ("markrouted.cli", "markrouted.__main__")
    ]


def level(name: str) -> tuple[str, int] | None:
    """The entry of ``LEVELS`` that places ``name``: its own, or its package's."""
    for key in (name, *(p for p in PACKAGES if within(name, p))):
        if key in LEVELS:
            return key, LEVELS[key]
    return None


def direction_violations(modules: Mapping[str, Module]) -> list[str]:
    out = [f"{name}: not placed in LEVELS" for name in modules if level(name) is None]
    for imp in _all_imports(modules):
        if not within(imp.target, "markrouted") or within(imp.importer, "markrouted.kernel"):
            continue  # the kernel's imports have the stricter contract above
        if any(within(imp.importer, p) and within(imp.target, p) for p in PACKAGES):
            continue
        src, dst = level(imp.importer), level(imp.target)
        if src is None or dst is None:
            continue
        if dst[1] >= src[1]:
            out.append(f"{imp}: {src[0]} (level {src[1]}) may not depend on {dst[0]} (level {dst[1]})")
    return out


# ------------------------------------------------------------------ the package


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return scan(PACKAGE_DIR)


def test_kernel_imports_only_the_model(modules: dict[str, Module]) -> None:
    assert kernel_violations(modules) == []


def test_pure_core_does_no_io(modules: dict[str, Module]) -> None:
    assert io_violations(modules) == []


def test_only_the_kernel_package_imports_pyroute2_and_nftables(modules: dict[str, Module]) -> None:
    assert library_violations(modules) == []


def test_nothing_imports_the_command_line(modules: dict[str, Module]) -> None:
    assert cli_violations(modules) == []


def test_dependencies_point_one_way(modules: dict[str, Module]) -> None:
    assert direction_violations(modules) == []


def test_imports_are_static(modules: dict[str, Module]) -> None:
    """importlib or __import__ would hide a dependency from every check above."""
    found = [
        f"{m.name}:{node.lineno}"
        for m in modules.values()
        for node in ast.walk(m.tree)
        if (isinstance(node, ast.Name) and node.id == "__import__")
        or (isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            within(n, "importlib") for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                             else [node.module or ""])))
    ]
    assert found == []


def test_every_pure_module_exists(modules: dict[str, Module]) -> None:
    assert [name for name in PURE if name not in modules] == []


# ------------------------------------------------------------------ the checker


def _package(tmp_path: Path, files: Mapping[str, str]) -> dict[str, Module]:
    root = tmp_path / "markrouted"
    for rel, text in {"__init__.py": "", "model.py": "", "kernel/__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return scan(root)


def test_checker_resolves_relative_and_function_level_imports(tmp_path: Path) -> None:
    mods = _package(tmp_path, {
        "kernel/rules.py": "from ..model import Rule\nfrom . import nl\n",
        "kernel/nl.py": "def f():\n    from .. import config\n",
        "config.py": "",
    })
    assert {(i.target, i.names) for i in mods["markrouted.kernel.rules"].imports} == {
        ("markrouted.model", ("Rule",)), ("markrouted.kernel.nl", ())}
    assert [i.target for i in mods["markrouted.kernel.nl"].imports] == ["markrouted.config"]


@pytest.mark.parametrize("rel, text, check", [
    ("kernel/rules.py", "def encode():\n    from ..derive import RANGE_CHAIN\n", kernel_violations),
    ("kernel/__init__.py", "from ..config import Config\n", kernel_violations),
    ("derive.py", "def now():\n    import time\n", io_violations),
    ("derive.py", "import socket\ns = socket.socket()\n", io_violations),
    ("derive.py", "from socket import create_connection\n", io_violations),
    ("derive.py", "import os\n", io_violations),
    ("diff.py", "from .kernel import Kernel\n", io_violations),
    ("model.py", "import pyroute2\n", io_violations),
    ("reconcile.py", "def f():\n    from pyroute2 import IPRoute\n", library_violations),
    ("status.py", "import nftables\n", library_violations),
    ("daemon/__init__.py", "def run():\n    from ..cli import main\n", cli_violations),
    ("model.py", "from .derive import derive\n", direction_violations),
    ("derive.py", "from .reconcile import reconcile\n", direction_violations),
    ("reconcile.py", "from .daemon import run\n", direction_violations),
    ("daemon/worker.py", "from ..cli import main\n", direction_violations),
    ("newthing.py", "", direction_violations),
])
def test_checker_finds_a_forbidden_import(tmp_path: Path, rel: str, text: str, check: object) -> None:
    base = {name: "" for name in ("config.py", "nftexpr.py", "derive.py", "diff.py", "health.py", "explain.py",
                                  "collisions.py", "reconcile.py", "status.py", "cli.py", "daemon/__init__.py")}
    clean = _package(tmp_path / "clean", base)
    dirty = _package(tmp_path / "dirty", {**base, rel: text})
    assert callable(check)
    assert check(clean) == []
    assert check(dirty) != []


def test_checker_allows_what_the_contracts_allow(tmp_path: Path) -> None:
    base = {name: "" for name in ("nftexpr.py", "derive.py", "diff.py", "health.py", "explain.py",
                                  "collisions.py", "reconcile.py", "status.py", "cli.py", "daemon/__init__.py")}
    mods = _package(tmp_path, {
        **base,
        "config.py": "import os\nimport socket\nAF = socket.AF_INET6\n",
        "kernel/netlink.py": "from pyroute2 import IPRoute\nfrom ..model import Rule\nfrom .errors import E\n",
        "kernel/errors.py": "",
        "reconcile.py": "from .derive import derive\nfrom .kernel import KernelAPI\n",
        "daemon/__init__.py": "from .worker import Worker\nfrom ..reconcile import reconcile\n",
        "daemon/worker.py": "from . import requests\n",
        "daemon/requests.py": "",
        "__main__.py": "from .cli import main\n",
    })
    for check in (kernel_violations, io_violations, library_violations, cli_violations, direction_violations):
        assert check(mods) == [], check.__name__
