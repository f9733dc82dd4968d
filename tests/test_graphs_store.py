"""The graph store: whole-data-set graphs written once, memory-mapped by resumes and re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL

from ldsc.graphs.graph_store import graph_problem, load_graphs, save_graphs
from ldsc.run import fit

#: a three-image data set, two solver steps (not converged: a resume has work left)
RUN = [*SMALL, "data.names=[astronaut.png,coffee.png,chelsea.png]", "graph=vv", "solver.tol=1e-9",
       "solver.iters_per_step=2", "trainer.max_epochs=2"]


def stages(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "stages.json").read_text())


def built_graphs(compose, tmp_path, extra=()):
    cfg = compose([*RUN, f"store.dir={tmp_path / 'store'}", *extra], out=tmp_path / "first")
    fit(cfg)
    return cfg


def test_stored_graphs_load_back_as_the_same_operator(compose, tmp_path):
    """The stored graphs are those the builder makes from the same feature store: the same
    products S·y, degrees, grids, sources and inter-image radii."""
    cfg = built_graphs(compose, tmp_path)
    folders = list((tmp_path / "store").glob("*/graphs/*"))
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    assert stages(cfg)["graphs"]["store_write_s"] >= 0
    loaded = load_graphs(folders[0])
    from ldsc.features.store import FeatureStore
    from ldsc.graphs.knn import KnnGraphBuilder

    fresh = KnnGraphBuilder("vv").dataset_graphs(FeatureStore(folders[0].parents[1]), 16, progress=False)
    assert [g.name for g in loaded] == [g.name for g in fresh]
    for a, b in zip(loaded, fresh):
        y = torch.randn(b.degree.numel(), 3, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(a.apply(y), b.apply(y), atol=1e-6)
        assert torch.equal(a.degree, b.degree) and a.grid == b.grid and a.source == b.source
        assert torch.equal(a.radius, b.radius)


def test_a_resumed_run_and_a_run_with_another_K_do_no_neighbour_search(compose, tmp_path, monkeypatch):
    first = built_graphs(compose, tmp_path)
    assert "reused" not in stages(first)["graphs"]
    import ldsc.graphs.search as search

    calls = []
    for name in ("intra_image_knn", "inter_image_knn"):
        real = getattr(search, name)
        monkeypatch.setattr(search, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    resumed = compose([*RUN, f"store.dir={tmp_path / 'store'}", "resume=true", "trainer.max_epochs=4"],
                      out=tmp_path / "first")
    fit(resumed)
    assert calls == [] and stages(resumed)["graphs"]["reused"]
    other_k = compose([*RUN, f"store.dir={tmp_path / 'store'}", "K=3"], out=tmp_path / "other_k")
    fit(other_k)
    assert calls == [] and torch.load(Path(other_k.paths.output_dir) / "eigvecs.pt", weights_only=True
                                      )["eigvecs"].shape[1] == 3
    rebuilt = compose([*RUN, f"store.dir={tmp_path / 'store'}", "graph.rebuild=true"], out=tmp_path / "rebuilt")
    fit(rebuilt)
    assert calls, "graph.rebuild=true must search again"
    calls.clear()
    other_graph = compose([*RUN, f"store.dir={tmp_path / 'store'}", "graph.k_intra=5"], out=tmp_path / "k5")
    fit(other_graph)
    assert calls, "other graph settings must build their own graphs"
    assert len(list((tmp_path / "store").glob("*/graphs/*"))) == 2


def test_a_resume_on_stored_graphs_equals_an_uninterrupted_run(compose, tmp_path, monkeypatch):
    whole = compose([*RUN, f"store.dir={tmp_path / 'store_whole'}", "trainer.max_epochs=4"], out=tmp_path / "whole")
    fit(whole)
    built_graphs(compose, tmp_path)
    import ldsc.graphs.search as search

    def refuse(*args, **kwargs):
        raise AssertionError("a neighbour search ran, though the graphs are stored")

    monkeypatch.setattr(search, "intra_image_knn", refuse)
    monkeypatch.setattr(search, "inter_image_knn", refuse)
    resumed = compose([*RUN, f"store.dir={tmp_path / 'store'}", "resume=true", "trainer.max_epochs=4"],
                      out=tmp_path / "first")
    fit(resumed)
    a, b = (torch.load(Path(c.paths.output_dir) / "eigvecs.pt", weights_only=True)["eigvecs"] for c in (whole, resumed))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncated array", "edited meta", "missing meta"])
def test_a_damaged_graph_store_is_found_and_built_again(compose, tmp_path, damage, caplog):
    built_graphs(compose, tmp_path)
    folder, = (tmp_path / "store").glob("*/graphs/*")
    identity = json.loads((folder / "meta.json").read_text())["identity"]
    assert graph_problem(folder, identity) is None
    if damage == "truncated array":
        f = folder / "0_0_col.npy"
        arr = np.load(f)
        np.save(f, arr[: len(arr) // 2])
        expected = "0_0_col.npy holds"
    elif damage == "edited meta":
        meta = json.loads((folder / "meta.json").read_text())
        meta["identity"]["graph"]["k_intra"] = 99
        (folder / "meta.json").write_text(json.dumps(meta))
        expected = "other settings"
    else:
        (folder / "meta.json").unlink()
        expected = "meta.json is missing"
    assert expected in graph_problem(folder, identity)
    again = compose([*RUN, f"store.dir={tmp_path / 'store'}"], out=tmp_path / "again")
    fit(again)  # built again (a warning names the problem), then stored afresh
    assert "reused" not in stages(again)["graphs"] and graph_problem(folder, identity) is None


def test_save_is_atomic_and_replaces(tmp_path):
    from ldsc.graphs.dataset import DatasetGraph

    crow, col, val = torch.tensor([0, 1, 2]), torch.tensor([1, 0]), torch.tensor([0.5, 0.5])
    g = DatasetGraph("l", (1, 2), 1, [(0, torch.sparse_csr_tensor(crow, col, val, (2, 2)))], torch.ones(2))
    folder = save_graphs(tmp_path / "g", [g], {"k": 1})
    assert graph_problem(folder, {"k": 1}) is None and graph_problem(folder, {"k": 2}) is not None
    save_graphs(folder, [g, g], {"k": 2})
    assert len(load_graphs(folder)) == 2 and not list(tmp_path.glob("*.tmp*"))


def test_the_memory_check_counts_mapped_graphs_as_not_built(compose, tmp_path, monkeypatch):
    """Reusing stored graphs builds nothing: only the solver's memory is counted, so a limit the
    build would exceed still lets a run on the stored graphs through."""
    from ldsc.errors import ConfigError
    from ldsc.features.backbones.pixel import PixelBackbone
    from ldsc.run import build_datamodule

    monkeypatch.setattr(PixelBackbone, "pass_bytes", lambda self, batch: None)  # the graphs' check, not the pass's
    cfg = built_graphs(compose, tmp_path)
    dm, _ = build_datamodule(cfg)
    dm.feature_store()
    full, mapped = dm.check_memory(), dm.check_memory(mapped_graphs=True)
    assert mapped["peak"] < full["peak"] and mapped["build"] == mapped["graphs"] == 0
    limit = (mapped["peak"] + full["peak"]) / 2 / 2**30
    reuse = compose([*RUN, f"store.dir={tmp_path / 'store'}", f"data.memory_limit_gb={limit}", "K=3"], out=tmp_path / "r")
    fit(reuse)
    assert stages(reuse)["graphs"]["reused"]
    rebuild = compose([*RUN, f"store.dir={tmp_path / 'store'}", f"data.memory_limit_gb={limit}", "graph.rebuild=true"],
                      out=tmp_path / "b")
    with pytest.raises(ConfigError, match="This run needs about"):
        fit(rebuild)


def test_a_run_on_stored_features_and_graphs_is_not_refused_for_a_backbone_pass_it_does_not_run(compose, tmp_path):
    """The feature store and the graphs are reused: no backbone pass, no search — a memory limit
    that a backbone pass would exceed does not stop the run; a new store under it is refused."""
    from ldsc.errors import ConfigError
    from ldsc.graphs.memory import PROCESS_BYTES
    from ldsc.run import build_datamodule

    cfg = built_graphs(compose, tmp_path)
    dm, _ = build_datamodule(cfg)
    dm.feature_store()
    mapped = dm.check_memory(mapped_graphs=True)["peak"]
    pass_need = PROCESS_BYTES + dm.backbone.pass_bytes(dm.batch_size)
    assert mapped < pass_need
    limit = (mapped + pass_need) / 2 / 2**30
    reuse = compose([*RUN, f"store.dir={tmp_path / 'store'}", f"data.memory_limit_gb={limit}", "K=3"], out=tmp_path / "r")
    fit(reuse)
    assert stages(reuse)["graphs"]["reused"]
    fresh = compose([*RUN, f"store.dir={tmp_path / 'other_store'}", f"data.memory_limit_gb={limit}"], out=tmp_path / "f")
    with pytest.raises(ConfigError, match="The backbone pass over a batch"):
        fit(fresh)


def test_graphs_symmetrised_on_a_thread_are_the_graphs_built_in_one_go(compose, tmp_path):
    """build(finish_graphs_in_background=True) (a one-process CLI run imports Lightning
    meanwhile) returns after the searches; dataset_graphs() waits for the symmetrisations and
    gives the same graphs, timings and graph store as the build in one go."""
    from ldsc.run import build_datamodule

    one = compose([*RUN, f"store.dir={tmp_path / 'one'}"], out=tmp_path / "a")
    dm, _ = build_datamodule(one, scope="dataset")
    dm.build()
    two = compose([*RUN, f"store.dir={tmp_path / 'two'}"], out=tmp_path / "b")
    bg, _ = build_datamodule(two, scope="dataset")
    bg.background_writes = True
    bg.stages = {}
    bg.build(finish_graphs_in_background=True)
    graphs = bg.dataset_graphs()
    bg.wait_for_writes()
    assert [g.name for g in graphs] == [g.name for g in dm.graphs]
    for a, b in zip(graphs, dm.graphs):
        y = torch.randn(b.degree.numel(), 3, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a.apply(y), b.apply(y)) and torch.equal(a.degree, b.degree) and torch.equal(a.radius, b.radius)
    assert bg.stages["graphs"]["symmetrize_s"] > 0 and all("nnz" in t for t in bg.stages["graphs"]["layers"])
    assert len(list((tmp_path / "two").glob("*/graphs/*/meta.json"))) == 1


def test_an_error_of_the_background_symmetrisation_is_raised_where_the_graphs_are_asked_for(compose, tmp_path,
                                                                                         monkeypatch):
    from ldsc.graphs.knn import KnnGraphBuilder
    from ldsc.run import build_datamodule

    def broken(self, layer):
        raise MemoryError("no room for the transposed lists")

    monkeypatch.setattr(KnnGraphBuilder, "symmetrized", broken)
    dm, _ = build_datamodule(compose([*RUN, f"store.dir={tmp_path / 's'}"]), scope="dataset")
    dm.build(finish_graphs_in_background=True)  # the searches: fine
    with pytest.raises(MemoryError, match="transposed lists"):
        dm.dataset_graphs()


def test_a_csr_made_on_another_thread_leaves_the_warning_filters_alone():
    """warnings.catch_warnings swaps the process's filter list: on a second thread it would drop
    filters the main thread adds meanwhile (Lightning's import, ours after it)."""
    import threading
    import warnings

    from ldsc.graphs.dataset import csr_tensor

    before = warnings.filters
    made = []
    t = threading.Thread(target=lambda: made.append(csr_tensor(torch.tensor([0, 1]), torch.tensor([0]),
                                                               torch.tensor([2.0]), (1, 1))))
    t.start()
    t.join()
    assert warnings.filters is before and made[0].to_dense().item() == 2.0
