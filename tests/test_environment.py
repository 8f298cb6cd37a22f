"""The environment files agree with each other and with the measured decisions of ARCHITECTURE.md."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.replace(" ", "") for d in deps}


def _conda_pip_pins() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml must have exactly one pip section"
    return {d.replace(" ", "") for d in pip_sections[0]}


def test_environment_yml_pip_section_matches_pyproject():
    py, conda = _pyproject_pins(), _conda_pip_pins()
    assert py == conda, f"only in pyproject: {sorted(py - conda)}; only in environment.yml: {sorted(conda - py)}"


def test_every_dependency_is_pinned_exactly():
    loose = [d for d in _pyproject_pins() if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", d)]
    assert not loose, f"pin these with ==: {loose}"


def test_torch_pair_is_the_measured_one():
    pins = _pyproject_pins()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    assert "jupyter-book==1.0.4.post1" in pins, "Jupyter Book 2 fetches its theme online (ARCHITECTURE.md)"


def test_nodeps_requirements_are_pinned_and_mentioned_in_environment_yml():
    lines = [ln.strip() for ln in (ROOT / "requirements-nodeps.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert reqs and all("==" in r for r in reqs)
    assert "requirements-nodeps.txt" in (ROOT / "environment.yml").read_text()


def test_installed_versions_match_the_pins():
    from importlib.metadata import PackageNotFoundError, version

    wrong = {}
    for pin in _pyproject_pins():
        name, want = pin.split("==")
        try:
            got = version(name)
        except PackageNotFoundError:
            got = "missing"
        if got != want:
            wrong[name] = (want, got)
    assert not wrong, f"installed versions differ from the pins (run `make setup`): {wrong}"


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = readme.split("\n## ")[1]  # the first section after the title: the two commands
    assert "make book" in commands and "make test" in commands, "README must open with the two commands"
    assert re.search(r"^make test\s*$", ci, re.M), ".ci/run must call `make test`"


def test_every_committed_artefact_is_package_data():
    """A non-editable install must ship every committed artefact of helpers/weights/."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["helpers.weights"]
    weights = ROOT / "helpers" / "weights"
    missing = [p.relative_to(weights).as_posix() for p in weights.rglob("*") if p.is_file()
               and not any(p.relative_to(weights).match(pat) or p.match(pat.removeprefix("**/")) for pat in patterns)]
    assert not missing, f"add patterns to [tool.setuptools.package-data] for {missing}"
    assert config["packages"]["find"]["namespaces"] is True, "data folders must be namespace packages"
