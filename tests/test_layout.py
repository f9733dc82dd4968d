"""The package layout follows the data flow: each stage imports only earlier stages and the shared
utilities, and the stages below the runtime never import Lightning or Hydra (so they can be used
from a notebook without them). Imports are read from the source (``ast``), function-level ones
included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ldsc"

#: the stages in data-flow order (a package, or a top-level module that belongs to the stage)
STAGES = {
    "ldsc.features": 1,
    "ldsc.graphs": 2,
    "ldsc.spectral": 3,
    "ldsc.solvers": 4,
    "ldsc.evaluation": 5, "ldsc.viz": 5,
}
#: helpers every stage may use: errors, collectives (no-ops in one process), progress, timings, safe writes
UTILITIES = {"ldsc.errors", "ldsc.distributed", "ldsc.progress", "ldsc.profiling", "ldsc.atomic"}
#: the stages that are laid out as packages so far (the rest of the layout moves in later steps)
PACKAGED = ["features", "graphs", "spectral", "evaluation"]


def _stage(module: str) -> int | None:
    for prefix, n in STAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return n
    return None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            if node.module == "ldsc":  # from ldsc import distributed
                out += [f"ldsc.{a.name}" for a in node.names]
    return out


def _modules(package: str):
    for f in sorted((SRC / package).rglob("*.py")):
        yield "ldsc." + ".".join(f.relative_to(SRC).with_suffix("").parts), f


@pytest.mark.parametrize("package", PACKAGED)
def test_a_stage_imports_only_earlier_stages_and_the_utilities(package):
    own = _stage(f"ldsc.{package}")
    for name, path in _modules(package):
        for imported in _imports(path):
            if not imported.startswith("ldsc.") or imported in UTILITIES:
                continue
            stage = _stage(imported)
            assert stage is not None and stage <= own, f"{name} imports {imported} (a later stage or the runtime)"


@pytest.mark.parametrize("package", PACKAGED)
def test_the_stages_below_the_runtime_import_neither_lightning_nor_hydra(package):
    for name, path in _modules(package):
        bad = [m for m in _imports(path) if m.split(".")[0] in ("lightning", "pytorch_lightning", "hydra")]
        assert not bad, f"{name} imports {bad}"


def test_no_module_sits_where_its_stage_has_a_package():
    """The moved modules are gone from the top level (no second copy, no alias module)."""
    for old in ("images", "store", "neighbors", "graphs", "attention_graph", "segment", "segment_viz",
                "cocostuff"):
        assert not (SRC / f"{old}.py").exists(), old
    assert (SRC / "features" / "backbones").is_dir() and not (SRC / "backbones").exists()
