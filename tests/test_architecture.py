"""The dependency direction of the package, checked on the source (an import scan).

entry points -> methods -> (models, losses, synthesis, data) -> nothing of ours; evaluation and metrics know
no method; no entry point imports another. Every import of a module under ``src/mcad`` (top-level or inside
a function) counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mcad"
ENTRY_POINTS = {"train", "evaluate", "predict", "export", "report", "import_weights"}
# What each layer may import from mcad (besides itself); utils is a leaf every layer may use.
ALLOWED = {
    "metrics": {"utils"},
    "evaluation": {"metrics", "utils"},
    "data": {"utils"},
    "models": {"utils"},
    "losses": {"utils"},
    "synthesis": {"utils"},
    "utils": set(),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The mcad modules ``path`` imports (absolute names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "mcad"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.split(".")[0] == "mcad":
                found.add(name)
    return found


def _edges() -> list[tuple[str, str]]:
    return [(_module_name(p), target) for p in sorted(SRC.rglob("*.py")) for target in sorted(_imports(p))]


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_lower_layers_never_import_methods_or_entry_points():
    bad = [
        (src, dst)
        for src, dst in _edges()
        if _top(src) in ALLOWED and _top(dst) != _top(src) and _top(dst) not in ALLOWED[_top(src)]
    ]
    assert not bad, "imports against the dependency direction:\n" + "\n".join(f"{s} -> {d}" for s, d in bad)


def test_no_entry_point_imports_another():
    bad = [(s, d) for s, d in _edges() if _top(s) in ENTRY_POINTS and _top(d) in ENTRY_POINTS and _top(s) != _top(d)]
    assert not bad, "entry points importing each other:\n" + "\n".join(f"{s} -> {d}" for s, d in bad)


def test_nothing_but_entry_points_imports_an_entry_point():
    bad = [(s, d) for s, d in _edges() if _top(d) in ENTRY_POINTS and _top(s) not in ENTRY_POINTS]
    assert not bad, "modules importing an entry point:\n" + "\n".join(f"{s} -> {d}" for s, d in bad)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_every_layer_exists(layer):
    # A renamed folder would make the rules above pass vacuously.
    assert (SRC / layer).is_dir()
