"""The package's shape, as ARCHITECTURE.md draws it: no import cycle (imports anywhere in a file),
the bottom layers import nothing above them, no module over 400 lines, bench/ and jobs/ use the
installed package, and tests/ mirrors the package (a test file per module)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "ilias_ray"
MAX_LINES = 400


def modules() -> dict:
    """{dotted name: path} of every module of the package."""
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path, known: dict) -> set:
    """The package modules `path` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ilias_ray"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ilias_ray"))
    return found


def graph() -> dict:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def cycle(edges: dict):
    """One import cycle (a list of modules), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    assert cycle(graph()) is None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one


def test_the_bottom_layers_import_nothing_above_them():
    edges = graph()
    assert edges["ilias_ray.errors"] == set()
    for m, deps in edges.items():
        if m.startswith("ilias_ray.storage"):
            assert all(d == "ilias_ray.errors" or d.startswith("ilias_ray.storage") for d in deps), (m, deps)
        if m.startswith("ilias_ray.output"):
            above = ("ilias_ray.plan.", "ilias_ray.stages", "ilias_ray.job", "ilias_ray.cli", "ilias_ray.models")
            assert not any(d.startswith(above) for d in deps), (m, deps)
        if not m.startswith(("ilias_ray.testing", "ilias_ray.cli")):
            # the runtime imports only the fault hook and the null backbone (by name) of testing/
            test_only = {d for d in deps if d.startswith("ilias_ray.testing")}
            assert test_only <= {"ilias_ray.testing.faults"}, (m, test_only)


def test_no_module_is_over_400_lines():
    files = [*PKG.rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "jobs").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_bench_and_jobs_use_the_installed_package():
    for p in [*(ROOT / "bench").glob("*.py"), *(ROOT / "jobs").glob("*.py")]:
        tree = ast.parse(p.read_text())
        calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert not [c for c in calls if c.startswith("sys.path.")], p.name
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n.split(".")[0] in ("tests", "conftest", "s3")], p.name


def test_tests_mirror_the_package():
    """tests/<folder>/test_<module>.py for each module; the models' tests are per framework family
    (tests/models/), and testing/'s helpers are tested through their use."""
    tests = ROOT / "tests"
    missing = []
    for m, p in modules().items():
        rel = p.relative_to(PKG)
        if rel.name == "__init__.py" or rel.parts[0] in ("models", "testing") or rel.name == "__main__.py":
            continue
        if not (tests / rel.parent / f"test_{rel.stem}.py").exists():
            missing.append(str(rel))
    assert missing == []
    for p in (tests / "testing").glob("test_*.py"):
        assert (PKG / "testing" / f"{p.stem[5:]}.py").exists(), p.name
