"""The layout is enforced: tiers and no cycles (read from every import), the map in docs/architecture.md
true to the tree, and the size limits of issue 18 (top level, module and test-file lengths)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "trady"
DOC = ROOT / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """trady modules that `name` imports anywhere in its code (module level and inside functions)."""
    path, out = MODULES[name], set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "trady":
                continue
            for alias in node.names:  # `from pkg import module` is an edge to that module
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "trady" and a.name in MODULES}
    out.discard(name)
    return out


def tiers_from_doc() -> tuple[dict[str, tuple[int, str]], dict[str, set[str]]]:
    """The tier table of docs/architecture.md: package -> (rank, tier), tier -> tiers it may import."""
    text = DOC.read_text().split("## Tiers", 1)[1].split("\n## ", 1)[0]
    packages, allowed = {}, {}
    for rank, tier, pkgs, may in re.findall(r"^\| (\d) (\w+) \| ([^|]+) \| ([^|]+) \|$", text, flags=re.M):
        for pkg in re.findall(r"`([\w.]+)`", pkgs):
            packages[pkg] = (int(rank), tier)
        allowed[tier] = {tier} | set(re.findall(r"\w+", may))
    return packages, allowed


PACKAGES, ALLOWED = tiers_from_doc()


def tier_of(module: str) -> str | None:
    for pkg in sorted(PACKAGES, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return PACKAGES[pkg][1]
    return None


def test_the_tier_table_is_read_and_covers_every_module() -> None:
    assert {"core", "models", "data", "memory", "engine", "selection", "train", "experiments", "cli"} <= set(ALLOWED)
    untiered = [m for m in MODULES if m != "trady" and tier_of(m) is None]
    assert not untiered, f"modules in no tier of docs/architecture.md: {untiered}"


def rank_of(tier: str) -> int:
    return next(r for r, t in PACKAGES.values() if t == tier)


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """Edges of `graph` (module -> modules it imports) that the tier table does not allow."""
    upward = []
    for name, deps in graph.items():
        t = tier_of(name)
        if t is None or "everything" in ALLOWED[t]:
            continue
        for dep in deps:
            d = tier_of(dep)
            if d is None:
                upward.append(f"{name} -> {dep} (the root package)")
            elif "above" in ALLOWED[t]:  # "all of the above": any tier of a lower rank
                if d != t and rank_of(d) >= rank_of(t):
                    upward.append(f"{name} -> {dep}")
            elif d not in ALLOWED[t]:
                upward.append(f"{name} -> {dep}")
    return upward


def test_imports_only_point_down() -> None:
    upward = upward_edges({name: imports_of(name) for name in MODULES})
    assert not upward, "imports against the tiers:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_an_upward_edge_and_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert tier_of("trady.core.errors") == "core" and tier_of("trady.engine.slices") == "engine"
    edge = {"trady.memory.timeline": {"trady.engine.costs"}}
    assert upward_edges(edge) == ["trady.memory.timeline -> trady.engine.costs"]
    assert upward_edges({"trady.train.plan": {"trady.experiments.sweep"}, "trady.models.base": {"trady.data.splits"}})
    two = {"trady.train.plan": {"trady.experiments.sweep"}, "trady.models.base": {"trady.data"}}
    assert len(upward_edges(two)) == 2
    assert upward_edges({"trady.cli.plan": {"trady.experiments.sweep"}, "trady.train.loop": {"trady.engine"}}) == []


def test_every_module_is_named_in_the_architecture_document() -> None:
    doc = DOC.read_text()
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*\.py\b", doc)) | set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*/", doc))
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.name in ("__init__.py", "__main__.py") and len(rel.parts) == 1:
            continue
        if rel.name == "__init__.py":
            if f"{rel.parts[-2]}/" not in named:
                missing.append(str(rel.parent) + "/")
        elif rel.name not in named:
            missing.append(str(rel))
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"


def test_the_top_level_keeps_at_most_12_entries() -> None:
    entries = sorted(p.name for p in SRC.iterdir() if p.name != "__pycache__")
    assert len(entries) <= 12, entries


@pytest.mark.parametrize(("folder", "limit"), [(SRC, 500), (ROOT / "tests", 600)])
def test_no_file_over_its_line_limit(folder: Path, limit: int) -> None:
    long = {str(p.relative_to(ROOT)): n for p in folder.rglob("*.py") if (n := len(p.read_text().splitlines())) > limit}
    assert not long, f"over {limit} lines: {long}"
