"""The runtime imports only what a plain ``pip install cryoai`` installs: every package that
``src/cryoai`` imports (at the top of a module or inside a function) is one of the standard
library's or of the project's ``dependencies``, not of an extra such as ``[test]`` (starfile,
cryosparc-tools, pytest). ``cryoai report`` without starfile is run in ``tests/test_projects.py``.
An optional feature may import a package of the ``[analysis]`` extra, inside a ``try`` that
catches ``ImportError`` (the feature is then left out and said)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cryoai"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_distributions() -> set[str]:
    """The project's ``dependencies`` (its requirements without an ``extra ==`` marker)."""
    requires = importlib.metadata.requires("cryoai") or []
    return {_normalise(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r}


def _extra_distributions(extra: str) -> set[str]:
    """The distributions of one of the project's extras."""
    requires = importlib.metadata.requires("cryoai") or []
    return {_normalise(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires
            if re.search(rf"extra\s*==\s*['\"]{extra}['\"]", r)}


#: Import names of optional packages whose distribution is named otherwise (where not installed).
_DISTRIBUTION_OF = {"umap": "umap-learn"}


def _guarded_names() -> set[str]:
    """Top-level names that src imports only inside ``try: ... except ImportError``."""
    guarded, anywhere = set(), set()
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        inside = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers):
                for child in node.body:
                    for sub in ast.walk(child):
                        if isinstance(sub, ast.Import):
                            inside.update(id(sub) for _ in sub.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    (guarded if id(node) in inside else anywhere).add(alias.name.split(".")[0])
    return guarded - anywhere


def _imported_top_level_names() -> dict[str, list[str]]:
    """Top-level module name -> the files importing it, for every absolute import in src."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(str(path.relative_to(SRC)))
    return found


def test_src_imports_only_runtime_dependencies():
    runtime = _runtime_distributions()
    assert {"torch", "numpy", "mrcfile"} <= runtime, runtime  # the metadata was read
    distributions = importlib.metadata.packages_distributions()
    optional = _extra_distributions("analysis")
    guarded = _guarded_names()
    wrong = {}
    for name, files in _imported_top_level_names().items():
        if name in sys.stdlib_module_names or name in ("cryoai", "__future__"):
            continue
        if name in guarded and _normalise(_DISTRIBUTION_OF.get(name, name)) in optional:
            continue
        dists = {_normalise(d) for d in distributions.get(name, [name])}
        if not dists & runtime:
            wrong[name] = sorted(set(files))
    assert not wrong, f"imported by src but not in pyproject's dependencies: {wrong}"
