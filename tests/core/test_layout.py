"""The shape of the library: its layers and their arrows, no import circles, papers use only the core's public
names, and the architecture branches and hook-name strings each live in one module.

The arrows point down: book -> papers -> core -> store. nnsight_backend (optional) sits beside the book,
on top of the core; mechbook.backends chooses between it and the core at load.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import mechbook

LIB = Path(mechbook.__file__).parent


def _modules(folder: str) -> list[Path]:
    return sorted((LIB / folder).rglob("*.py"))


def _imports(path: Path):
    """(module, name) for every ``from X import name`` and (module, None) for every ``import X``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _mechbook_imports(path: Path) -> set[str]:
    """The mechbook modules ``path`` imports, anywhere in it (inside functions too): ``from a.b import c`` is
    ``a.b.c`` when that is a module, else ``a.b``."""
    known = {_module_name(p) for p in LIB.rglob("*.py")}
    found = set()
    for module, name in _imports(path):
        if not module.startswith("mechbook"):
            continue
        sub = f"{module}.{name}" if name else module
        found.add(sub if sub in known else module)
    return found - {_module_name(path)}


# what each layer may import, besides itself and the standard and third-party libraries
LAYERS = {
    "store": ("mechbook.store", "mechbook.core.errors"),
    "core": ("mechbook.core", "mechbook.store"),
    "papers": ("mechbook.core",),  # and its own paper's package
    "nnsight_backend": ("mechbook.nnsight_backend", "mechbook.core", "mechbook.store"),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_the_layers_below(layer):
    for path in _modules(layer):
        allowed = LAYERS[layer]
        if layer == "papers":
            allowed = (*allowed, ".".join(_module_name(path).split(".")[:3]))  # mechbook.papers.<paper>
        for module in _mechbook_imports(path):
            assert module.startswith(allowed), f"{path.relative_to(LIB)} imports {module}"


def test_there_are_no_import_circles():
    """No module reaches itself through the modules it imports (function-level imports count too)."""
    graph = {_module_name(p): _mechbook_imports(p) for p in LIB.rglob("*.py")}
    graph = {m: {t for t in targets if t in graph} for m, targets in graph.items()}
    circles = []
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            here = todo.pop()
            if here == start:
                circles.append(start)
                break
            if here not in seen:
                seen.add(here)
                todo.extend(graph[here])
    assert not circles, f"modules in an import circle: {sorted(circles)}"


def test_papers_and_plumbing_use_only_public_core_names():
    for path in _modules("papers") + _modules("book"):
        text = path.read_text()
        for module, name in _imports(path):
            if module.startswith("mechbook.core") and name is not None:
                assert not name.startswith("_"), f"{path.relative_to(LIB)} imports {module}.{name}"
        core_modules = {name for module, name in _imports(path) if module == "mechbook.core" and name}
        for alias in core_modules:
            private = re.findall(rf"(?<![\w.]){alias}\._\w+", text)
            assert not private, f"{path.relative_to(LIB)} uses {private}"


def test_architecture_branches_live_in_one_module():
    """Only core/architectures.py looks at a model's architecture (the loaders record it as the model's family)."""
    for path in LIB.rglob("*.py"):
        if path.name in ("architectures.py",):
            continue
        for line in path.read_text().splitlines():
            if "model_type" in line and not line.strip().startswith("#"):
                assert path.name in ("loading.py", "weightless.py") and "family" in line, f"{path.relative_to(LIB)}: {line.strip()}"


def test_hook_names_are_built_in_one_module():
    pattern = re.compile(r"""["'](?:blocks\.|ln_final\.hook)""")
    for path in LIB.rglob("*.py"):
        if path.name == "names.py":
            continue
        code = [line for line in path.read_text().splitlines()
                if not line.strip().startswith("#") and "``" not in line]
        hits = [line.strip() for line in code if pattern.search(line)]
        assert not hits, f"{path.relative_to(LIB)} builds hook names by hand: {hits[:3]}"
