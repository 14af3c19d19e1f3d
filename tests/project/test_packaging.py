"""pyproject.toml declares the ranges the code supports; requirements*.txt pin the exact versions
`make`, CI and the Dockerfile install. Every pin must lie inside its declared range, and every
declared dependency must be pinned, so that the two cannot drift apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


ROOT = Path(__file__).resolve().parents[2]


def declared(group: str) -> dict:
    """{name: Requirement} of pyproject's runtime dependencies, or of one optional group."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if group == "runtime" else project["optional-dependencies"][group]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def pinned(filename: str) -> dict:
    """{name: Requirement} of the `name==version` lines of one requirements file (not its -r lines)."""
    out = {}
    for line in (ROOT / filename).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


def exact(req: Requirement) -> str:
    (spec,) = req.specifier  # one specifier, and it is ==
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


@pytest.mark.parametrize("group, filename", [("runtime", "requirements.txt"), ("test", "requirements-test.txt")])
def test_every_pin_lies_in_its_declared_range(group, filename):
    ranges, pins = declared(group), pinned(filename)
    assert set(ranges) == set(pins), (
        f"declared but not pinned: {set(ranges) - set(pins)}; pinned but not declared: {set(pins) - set(ranges)}"
    )
    for name, pin in pins.items():
        version = exact(pin)
        assert ranges[name].specifier.contains(version, prereleases=True), (
            f"{filename} pins {name}=={version}, outside pyproject's {ranges[name]}"
        )
        assert ranges[name].extras == pin.extras, f"{name}: extras {pin.extras} pinned, {ranges[name].extras} declared"


def test_every_demo_dependency_is_pinned_for_the_tests():
    """The demo extra is what `make demo` needs on top of the runtime: requirements-test.txt pins it
    (make installs that file for both targets), inside its range, and the test extra repeats it."""
    demo, pins, test = declared("demo"), pinned("requirements-test.txt"), declared("test")
    for name, req in demo.items():
        assert name in pins, f"{name} (demo extra) is not pinned in requirements-test.txt"
        assert req.specifier.contains(exact(pins[name]), prereleases=True), f"{pins[name]} outside the demo's {req}"
        assert name in test and test[name].specifier == req.specifier, f"the test extra does not repeat {req}"


def test_scikit_image_is_not_a_runtime_dependency():
    """`pip install .` does not install what only the sample data needs (issue 20, item 5)."""
    assert "scikit-image" not in declared("runtime")
    assert "scikit-image" not in pinned("requirements.txt")
    assert "scikit-image" in declared("demo")


@pytest.mark.parametrize("group", ["runtime", "test", "demo"])
def test_declared_ranges_are_ranges_not_pins(group):
    """A pin in pyproject would make `pip install` of this package replace a lab's torch or Ray."""
    for name, req in declared(group).items():
        ops = {s.operator for s in req.specifier}
        assert "==" not in ops and "===" not in ops, f"pyproject pins {req}: declare a range"
        assert ">=" in ops and "<" in ops, f"{req}: give a lower bound (an API the code uses) and an upper one"


def test_the_check_catches_a_pin_outside_its_range():
    """The comparison above is packaging's, on real version strings: a pin one major above the
    range's end is caught."""
    req = declared("runtime")["torch"]
    upper = next(s.version for s in req.specifier if s.operator == "<")
    assert not req.specifier.contains(upper)
    assert req.specifier.contains(exact(pinned("requirements.txt")["torch"]))
