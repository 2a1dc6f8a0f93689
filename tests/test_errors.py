"""Every error the pack defines derives from DreamIDError (so one ``except DreamIDError`` catches them all).

dreamid_core and training are imported and walked module by module; nodes/ imports comfy, so its source
is read with ``ast`` instead and each base class is resolved through the file's imports.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import dreamid_core
import training
from dreamid_core.errors import DreamIDError

ROOT = Path(__file__).resolve().parents[1]


def _modules(package):
    yield package
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith(".__main__"):  # importing it runs the command line
            continue
        yield importlib.import_module(info.name)


def _defined_exceptions(package) -> list[type]:
    found = []
    for module in _modules(package):
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and issubclass(obj, BaseException):
                found.append(obj)
    return found


@pytest.mark.parametrize("package", [dreamid_core, training], ids=lambda p: p.__name__)
def test_every_exception_in_package_derives_from_dreamid_error(package):
    found = _defined_exceptions(package)
    assert found, f"no exception classes found in {package.__name__}: the walk is broken"
    strays = [f"{cls.__module__}.{cls.__qualname__}" for cls in found if not issubclass(cls, DreamIDError)]
    assert not strays, f"derive these from dreamid_core.errors.DreamIDError: {strays}"


def _imported_names(tree: ast.Module, package: str = "nodes") -> dict[str, tuple[str, str]]:
    """name -> (module path relative to the repo root, dotted; name in that module). ``package``: the dotted
    package of the file (``nodes`` or ``nodes.adapters``); relative imports that climb above ``nodes`` reach
    the repo root (``..dreamid_core`` from nodes/, ``...dreamid_core`` from nodes/adapters/)."""
    names = {}
    parts = package.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = parts[: len(parts) - (node.level - 1)]
                dotted = ".".join([*base, module] if module else base) if base else module
            else:
                dotted = module
            for alias in node.names:
                names[alias.asname or alias.name] = (dotted, alias.name)
    return names


def _node_classes() -> dict[str, dict[str, ast.ClassDef]]:
    out = {}
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[module] = (tree, {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)})
    return out


def _resolve(module: str, name: str, nodes_src, seen=()) -> list[type]:
    """The real base classes a name in a nodes/ module stands for (empty when not a class we can see)."""
    if (module, name) in seen:
        return []
    seen = (*seen, (module, name))
    if module in nodes_src:
        tree, classes = nodes_src[module]
        if name in classes:
            bases = []
            for base in classes[name].bases:
                if isinstance(base, ast.Name):
                    bases += _resolve(module, base.id, nodes_src, seen)
                elif isinstance(base, ast.Attribute):
                    bases += _resolve(module, base.attr, nodes_src, seen)
            return bases
        package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
        imported = _imported_names(tree, package).get(name)
        if imported is not None:
            return _resolve(imported[0], imported[1], nodes_src, seen)
        value = getattr(builtins, name, None)
        return [value] if isinstance(value, type) else []
    if module.split(".")[0] in ("dreamid_core", "training"):
        value = getattr(importlib.import_module(module), name, None)
        return [value] if isinstance(value, type) else []
    return []


def test_every_exception_in_nodes_derives_from_dreamid_error():
    nodes_src = _node_classes()
    exceptions, strays = [], []
    for module, (_, classes) in nodes_src.items():
        for name in classes:
            bases = _resolve(module, name, nodes_src)
            if any(issubclass(b, BaseException) for b in bases):
                exceptions.append(f"{module}.{name}")
                if not any(issubclass(b, DreamIDError) for b in bases):
                    strays.append(f"{module}.{name}")
    assert "nodes.adapters.validation.NodeInputError" in exceptions, "the ast walk no longer sees nodes' errors"
    assert not strays, f"derive these from dreamid_core.errors.DreamIDError: {strays}"


def test_the_walk_would_catch_a_stray():
    """A plain ValueError subclass in a nodes/ file is reported (the nodes check can fail)."""
    tree = ast.parse("class Stray(ValueError):\n    pass\n")
    nodes_src = {"nodes.fake": (tree, {"Stray": tree.body[0]})}
    bases = _resolve("nodes.fake", "Stray", nodes_src)
    assert bases == [ValueError] and not any(issubclass(b, DreamIDError) for b in bases)
