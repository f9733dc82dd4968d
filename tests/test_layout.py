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
    "ldsc.estimator": 4, "ldsc.solvers": 4,
    "ldsc.evaluation": 5, "ldsc.export": 5,
    "ldsc.runtime": 6,
    "ldsc.run": 7, "ldsc.extend": 7, "ldsc.evaluate": 7, "ldsc.bench": 7, "ldsc.layers": 7,
}
#: helpers every stage may use: errors, collectives (no-ops in one process), progress, timings, safe
#: writes, the signal flag long loops check
UTILITIES = {"ldsc.errors", "ldsc.distributed", "ldsc.progress", "ldsc.profiling", "ldsc.atomic", "ldsc.interrupt"}
#: the stages laid out as packages
PACKAGED = ["features", "graphs", "spectral", "solvers", "evaluation", "runtime"]
#: the packages and modules that may import Lightning or Hydra
FRAMEWORK = {"solvers", "runtime"}


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
    package = package.removeprefix("ldsc.")
    if (SRC / f"{package}.py").is_file():
        yield f"ldsc.{package}", SRC / f"{package}.py"
        return
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


@pytest.mark.parametrize("package", [p for p in PACKAGED if p not in FRAMEWORK] + ["estimator", "export", *sorted(UTILITIES)])
def test_the_stages_below_the_runtime_import_neither_lightning_nor_hydra(package):
    for name, path in _modules(package):
        bad = [m for m in _imports(path) if m.split(".")[0] in ("lightning", "pytorch_lightning", "hydra")]
        assert not bad, f"{name} imports {bad}"


def test_no_module_sits_where_its_stage_has_a_package():
    """The moved modules are gone from the top level (no second copy, no alias module)."""
    for old in ("images", "store", "neighbors", "graphs", "attention_graph", "segment", "segment_viz",
                "cocostuff", "spectral", "viz", "data", "callbacks", "validate", "run_folder", "strategies"):
        assert not (SRC / f"{old}.py").exists(), old
    assert (SRC / "features" / "backbones").is_dir() and not (SRC / "backbones").exists()


def test_every_module_belongs_to_a_stage_or_is_a_utility():
    """No module outside the layout: each file under src/ldsc is in a stage or a utility."""
    for f in sorted(SRC.rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        if parts == ("__init__",):
            continue
        name = "ldsc." + ".".join(p for p in parts if p != "__init__")
        assert name in UTILITIES or _stage(name) is not None, f"{name} belongs to no stage"


@pytest.mark.parametrize("module", ["ldsc.run", "ldsc.extend", "ldsc.evaluate", "ldsc.bench", "ldsc.layers", "ldsc.estimator", "ldsc.export"])
def test_top_level_modules_import_only_their_own_or_earlier_stages(module):
    own = _stage(module)
    for name, path in _modules(module):
        for imported in _imports(path):
            if imported.startswith("ldsc.") and imported not in UTILITIES:
                stage = _stage(imported)
                assert stage is not None and stage <= own, f"{name} imports {imported}"


def test_both_graph_types_follow_the_graph_builder_protocol():
    """The data module talks to graph types through one protocol (ldsc.graphs.base), as to backbones."""
    from ldsc.graphs.attention import AttentionGraphBuilder
    from ldsc.graphs.base import GraphBuilder
    from ldsc.graphs.knn import KnnGraphBuilder

    for builder in (KnnGraphBuilder("vv"), AttentionGraphBuilder()):
        assert isinstance(builder, GraphBuilder), type(builder).__name__
    assert KnnGraphBuilder("vv").memory_estimate(10, [{"grid": [8, 8], "heads": 1, "dim": 16}], 1, 8)["peak"] > 0
    assert AttentionGraphBuilder().memory_estimate(10, [], 1, 8) is None


def test_the_runtime_asks_graph_builders_nothing_outside_the_protocol():
    """No hasattr/getattr guesses about the graph builder in the data module."""
    text = (SRC / "runtime" / "data.py").read_text()
    assert "hasattr(self.graph_builder" not in text and "getattr(b," not in text and "getattr(builder" not in text
