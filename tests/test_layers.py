"""The package's layer rule (docs/architecture.md): every import, at the top of a module or
inside a function, goes to the same package or to a lower layer, and no modules import each
other in a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "plugin" / "ruletag"

#: Lowest first. Packages on one line are siblings: neither imports the other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ruletag", "ruletag.errors", "ruletag.extensions", "ruletag.heap"),
    ("ruletag.config",),
    ("ruletag.protocol", "ruletag.rules"),
    ("ruletag.transport",),
    ("ruletag.enrich",),
    ("ruletag.delivery",),
    ("ruletag.runtime",),
    ("ruletag.commands",),
    ("ruletag.cli",),
    ("ruletag.__main__",),
)


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("ruletag", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _extensions() -> set[str]:
    """The C extension modules: each ``PyInit_<name>`` in a ``.c`` file of the package. They
    import nothing of ruletag, so importing one is not an import of its package."""
    names = set()
    for path in PACKAGE.rglob("*.c"):
        for m in re.finditer(r"\bPyInit_(\w+)", path.read_text("utf-8")):
            names.add(".".join(("ruletag", *path.parent.relative_to(PACKAGE).parts, m.group(1))))
    return names


EXTENSIONS = _extensions()


def _group(module: str) -> str:
    """The layer entry a module belongs to (the longest matching prefix)."""
    best = ""
    for names in LAYERS:
        for name in names:
            if name == "ruletag" and module != "ruletag":
                continue
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best = name
    assert best, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def _rank(group: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if group in names)


def _imports(module: str, path: Path) -> set[str]:
    """Every ruletag module ``module`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text("utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name not in EXTENSIONS]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_pkg else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # "from pkg import name": name is a submodule (Python or C) or an attribute of pkg.
            subs = [f"{base}.{a.name}" for a in node.names]
            names = [n if n in MODULES else base for n in subs if n not in EXTENSIONS]
        else:
            continue
        found.update(n for n in names if n == "ruletag" or n.startswith("ruletag."))
    found.discard(module)
    return found


GRAPH = {mod: _imports(mod, path) for mod, path in MODULES.items()}


def test_every_import_resolves_to_a_module() -> None:
    unknown = {(m, t) for m, targets in GRAPH.items() for t in targets if t not in MODULES}
    assert not unknown


def test_no_module_imports_from_a_higher_layer_or_a_sibling() -> None:
    bad = []
    for mod, targets in GRAPH.items():
        group = _group(mod)
        for target in targets:
            other = _group(target)
            if other != group and _rank(other) >= _rank(group):
                bad.append(f"{mod} -> {target}")
    assert not bad, "imports against the layer rule:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for target in sorted(GRAPH.get(mod, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[mod] = 2

    for mod in sorted(GRAPH):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("ruletag.delivery.pipeline", "ruletag.runtime.relay"),
        ("ruletag.protocol.connection", "ruletag.rules.ir"),
        ("ruletag.rules.loader", "ruletag.enrich.annotate"),
    ],
)
def test_the_check_catches_an_upward_or_sibling_import(source: str, target: str) -> None:
    assert _rank(_group(target)) >= _rank(_group(source))


# --------------------------------------------------------------------------- the module table

ARCHITECTURE = PACKAGE.parents[1] / "docs" / "architecture.md"


def _module_table() -> set[str]:
    """The names in backticks in the first column of docs/architecture.md's "Modules" table."""
    text = ARCHITECTURE.read_text("utf-8")
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split(" | ", 1)[0]
            names.update(re.findall(r"`([^`]+)`", first))
    return names


def _table_name(path: Path) -> tuple[str, ...]:
    """How the table may name a module: its path under ruletag/, or a package's folder."""
    rel = path.relative_to(PACKAGE).as_posix()
    if path.name == "__init__.py" and path.parent != PACKAGE:
        return (rel, rel.removesuffix("__init__.py"))
    return (rel,)


def test_the_module_table_names_every_module() -> None:
    names = _module_table()
    missing = [
        _table_name(p)[-1] for p in MODULES.values() if not names.intersection(_table_name(p))
    ]
    assert not missing, f"modules missing from docs/architecture.md's table: {sorted(missing)}"
    stale = [n for n in names if n.endswith((".py", "/")) and not (PACKAGE / n).exists()]
    assert not stale, f"docs/architecture.md's table names what does not exist: {sorted(stale)}"
