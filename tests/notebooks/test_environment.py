"""environment.yml (conda) must pin exactly what pyproject.toml pins: dependencies and the notebooks/test extras."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml comes with the test extra: pip install -e '.[test]'")
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

REPO = Path(__file__).resolve().parents[2]


def _normal(requirement: str) -> str:
    """Lower case, no spaces, '_' and '-' alike: how pip compares names."""
    name, rest = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement.strip()).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest.replace(" ", "")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _environment() -> dict:
    return yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))


def _pip_section(environment: dict) -> list[str]:
    sections = [entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict) and "pip" in entry]
    assert len(sections) == 1, "environment.yml needs exactly one pip: section"
    return sections[0]


def test_environment_pins_match_pyproject():
    project = _pyproject()
    expected = project["dependencies"] + project["optional-dependencies"]["notebooks"] \
        + project["optional-dependencies"]["test"]
    pinned = [line for line in _pip_section(_environment()) if not line.startswith("-")]
    missing = sorted({_normal(r) for r in expected} - {_normal(r) for r in pinned})
    extra = sorted({_normal(r) for r in pinned} - {_normal(r) for r in expected})
    assert not missing and not extra, (
        f"environment.yml and pyproject.toml disagree; only in pyproject.toml: {missing}, "
        f"only in environment.yml: {extra}. Copy the ranges from pyproject.toml into environment.yml."
    )
    assert any(_normal(r).startswith("torch") for r in pinned), "environment.yml must pin torch like pyproject.toml"


def test_environment_installs_the_course_and_a_supported_python():
    environment = _environment()
    assert environment["name"] == "chatglm-course"
    assert "-e ." in _pip_section(environment), "the pip section must install the course itself (-e .)"
    python = next(d for d in environment["dependencies"] if isinstance(d, str) and d.startswith("python="))
    version = tuple(int(x) for x in python.split("=", 1)[1].split(".")[:2])
    minimum = re.match(r">=\s*(\d+)\.(\d+)", _pyproject()["requires-python"]).groups()
    assert version >= tuple(int(x) for x in minimum)
    assert "pip" in environment["dependencies"]
