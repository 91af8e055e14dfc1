"""The shape of the library: the core knows no paper, papers use only the core's public names, and the
architecture branches and hook-name strings each live in one module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

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


def test_the_core_imports_no_paper_and_no_book_plumbing():
    for path in _modules("core"):
        for module, _ in _imports(path):
            assert not module.startswith(("mechbook.papers", "mechbook.book")), (path.name, module)


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
    """Only core/architectures.py looks at a model's architecture (loading records it as the model's family)."""
    for path in LIB.rglob("*.py"):
        if path.name in ("architectures.py",):
            continue
        for line in path.read_text().splitlines():
            if "model_type" in line and not line.strip().startswith("#"):
                assert path.name == "loading.py" and "family" in line, f"{path.relative_to(LIB)}: {line.strip()}"


def test_hook_names_are_built_in_one_module():
    pattern = re.compile(r"""["'](?:blocks\.|ln_final\.hook)""")
    for path in LIB.rglob("*.py"):
        if path.name == "names.py":
            continue
        code = [line for line in path.read_text().splitlines()
                if not line.strip().startswith("#") and "``" not in line]
        hits = [line.strip() for line in code if pattern.search(line)]
        assert not hits, f"{path.relative_to(LIB)} builds hook names by hand: {hits[:3]}"
