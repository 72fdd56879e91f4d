"""The public API's shape: names a newcomer can guess, no module shadowed by a function, one-way imports."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import vitcompact as vc

ROOT = Path(vc.__file__).parent


def test_modules_and_functions_never_share_a_name():
    # The sibling folders install as subpackages too (an editable install maps them by name).
    modules = {m.name for m in pkgutil.iter_modules(vc.__path__)} | {"export", "bench", "pipeline", "cli"}
    assert {"pruning", "training", "compaction", "data", "models"} <= modules
    for name in modules:
        imported = importlib.import_module(f"vitcompact.{name}")
        # `import vitcompact.X as m` binds the attribute X of the package: it must be the module.
        assert getattr(vc, name, imported) is imported, name
    for name in vc.__all__:
        assert name not in modules, f"vc.{name} shares its name with the module vitcompact.{name}"
    import vitcompact.pruning as pruning
    assert pruning.PruneMasks is vc.PruneMasks and callable(vc.prune) and callable(vc.compact)


def test_two_doors_for_models():
    public = set(vc.__all__)
    assert {"create_model", "load", "save"} <= public
    assert not {"load_model", "load_checkpoint"} & public
    assert not hasattr(vc, "load_model") and not hasattr(vc, "load_checkpoint")


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = ".".join(("vitcompact", *path.relative_to(ROOT).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.add(f"{base}.{node.module}" if node.level and node.module else (node.module or base))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_training_does_not_import_pruning():
    for path in sorted((ROOT / "training").glob("*.py")):
        assert not [n for n in _imports(path) if n.startswith("vitcompact.pruning")], path.name


def test_the_core_never_imports_what_is_built_on_it():
    above = ("vitcompact.export", "vitcompact.bench", "vitcompact.pipeline", "vitcompact.cli")
    for path in sorted(ROOT.rglob("*.py")):
        assert not [n for n in _imports(path) if n.startswith(above)], path.relative_to(ROOT)
