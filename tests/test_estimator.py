"""``ldsc.LDSC`` (src/ldsc/estimator.py): fit on token tensors, transform new images, save/load,
the README's snippet, and what the library must not import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ldsc import LDSC
from ldsc.errors import ConfigError, DataError
from ldsc.features.backbones.base import LayerFeatures
from ldsc.features.backbones.pixel import PixelBackbone
from ldsc.features.store import MemoryStore
from ldsc.spectral import exact_eigenvectors, subspace_alignment

ROOT = Path(__file__).resolve().parents[1]


def planted_layers(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """Two layers (8x8, 4x4) of tokens from 3 clusters, each image's left half one cluster and its
    right half another: a graph with clear eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=g) * 3
    out = []
    for side in (8, 4):
        t = torch.empty(n, side, side, 16)
        for i in range(n):
            t[i, :, : side // 2] = centres[i % 3]
            t[i, :, side // 2:] = centres[(i + 1) % 3]
        out.append(t + 0.3 * torch.randn(t.shape, generator=g))
    return out


def test_fit_gives_the_exact_reference_eigenvectors_of_its_graphs():
    layers = planted_layers()
    model = LDSC(K=4, graph="vv", k_intra=6, k_inter=6, tol=1e-6, progress=False).fit(layers)
    assert model.eigenvectors_.shape == (6, 4, 8, 8) and model.eigenvalues_.shape == (4,)
    store = MemoryStore([LayerFeatures(name=f"l{i}", v=t[:, None]) for i, t in enumerate(layers)], ["v"])
    graphs = model.builder.dataset_graphs(store, 8, progress=False)
    values, ref = exact_eigenvectors(graphs, (8, 8), K=4)
    assert subspace_alignment(model.eigenvectors_, ref) > 0.9999
    assert torch.allclose(model.eigenvalues_.double(), values, atol=1e-4)


def test_the_input_forms_give_the_same_eigenvectors():
    layers = planted_layers()
    kw = dict(K=3, graph="vv", k_intra=6, k_inter=6, progress=False)
    plain = LDSC(**kw).fit(layers).eigenvectors_
    dicts = LDSC(**kw).fit([{"v": t, "name": f"layer{i}"} for i, t in enumerate(layers)]).eigenvectors_
    feats = LDSC(**kw).fit([LayerFeatures(name=f"l{i}", v=t[:, None]) for i, t in enumerate(layers)]).eigenvectors_
    assert torch.allclose(plain, dicts) and torch.allclose(plain, feats)


def test_transform_of_each_image_is_independent_of_the_others_and_of_earlier_calls():
    layers = planted_layers(10)
    model = LDSC(K=3, graph="vv", k_intra=6, k_inter=6, progress=False).fit([t[:6] for t in layers])
    both = model.transform([t[6:] for t in layers])
    first = model.transform([t[6:8] for t in layers])
    second = model.transform([t[8:] for t in layers])
    assert both.shape == (4, 3, 8, 8)
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)
    assert torch.allclose(model.transform([t[8:] for t in layers]), second)  # nothing kept between calls


def test_an_image_fitted_again_lands_on_its_fitted_eigenvectors():
    layers = planted_layers(9)
    model = LDSC(K=3, graph="vv", k_intra=6, k_inter=6, progress=False).fit(layers)
    again = model.transform([t[:3] for t in layers])
    assert subspace_alignment(again, model.eigenvectors_[:3]) > 0.95


def test_transform_on_real_images_matches_a_fit_that_included_them(coco_dir):
    """The issue's quality measure at a test's size: 80 COCO images fitted, 21 embedded."""
    from ldsc.features.images import image_tensor

    paths = sorted(coco_dir.glob("*.jpg"))
    bb = PixelBackbone(n_features=32)
    feats = bb(torch.stack([image_tensor(p, bb.input_size) for p in paths]))
    layers = [f.v[:, 0] for f in feats]
    n_fit = 80
    part = LDSC(K=15, graph="vv", progress=False).fit([t[:n_fit] for t in layers])
    extended = part.transform([t[n_fit:] for t in layers])
    full = LDSC(K=15, graph="vv", progress=False).fit(layers)
    assert subspace_alignment(extended, full.eigenvectors_[n_fit:]) >= 0.9


def test_qk_graphs_from_dicts_fit_and_transform():
    g = torch.Generator().manual_seed(1)
    layers = [{"q": t, "k": t + 0.2 * torch.randn(t.shape, generator=g)} for t in planted_layers(8)]
    model = LDSC(K=3, graph="qk", k_intra=6, k_inter=6, progress=False).fit([{k: v[:6] for k, v in d.items()} for d in layers])
    Z = model.transform([{k: v[6:] for k, v in d.items()} for d in layers])
    assert Z.shape == (2, 3, 8, 8) and torch.isfinite(Z).all() and Z.abs().sum() > 0
    assert not model.graphs_[0].symmetric


def test_save_and_load_give_the_same_model(tmp_path):
    layers = planted_layers(8)
    model = LDSC(K=3, graph="vv", k_intra=6, k_inter=6, progress=False).fit([t[:6] for t in layers])
    path = model.save(tmp_path / "model.safetensors")
    loaded = LDSC.load(path, progress=False)
    assert loaded.get_params() == model.get_params()
    assert torch.equal(loaded.eigenvectors_, model.eigenvectors_)
    assert torch.allclose(loaded.transform([t[6:] for t in layers]), model.transform([t[6:] for t in layers]))
    # tensors only: the file is safetensors, readable without running code
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "eigenvectors" in f.keys() and "ldsc" in f.metadata()


def test_a_damaged_model_file_is_one_sentence(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="not a readable LDSC model file"):
        LDSC.load(bad)
    with pytest.raises(DataError, match="No fitted LDSC model"):
        LDSC.load(tmp_path / "missing.safetensors")


def test_bad_inputs_are_one_sentence():
    layers = planted_layers(2)
    with pytest.raises(ConfigError, match="must be smaller than"):
        LDSC(K=200, progress=False).fit([t[:1] for t in layers])
    with pytest.raises(ConfigError, match="not fitted"):
        LDSC(progress=False).transform(layers)
    with pytest.raises(ConfigError, match=r"expected \(n_images, h, w, d\)"):
        LDSC(progress=False).fit([torch.zeros(3, 4)])
    with pytest.raises(ConfigError, match="graph must be one of"):
        LDSC(graph="vk")
    model = LDSC(K=2, k_intra=4, k_inter=4, progress=False).fit(layers)
    with pytest.raises(ConfigError, match="differ from the fitted ones"):
        model.transform(layers[:1])


def test_fit_from_images_through_a_backbone_equals_fit_on_its_vectors():
    from ldsc.features.images import image_tensor, sample_paths

    paths = sample_paths()[:3]
    bb = PixelBackbone(n_features=16)
    by_images = LDSC(K=4, progress=False).fit(paths, backbone=bb).eigenvectors_
    vectors = [f.v[:, 0] for f in bb(torch.stack([image_tensor(p, bb.input_size) for p in paths]))]
    assert torch.allclose(by_images, LDSC(K=4, progress=False).fit(vectors).eigenvectors_, atol=1e-5)


def test_defaults_are_the_configs():
    """One source of truth: the estimator's defaults are conf/'s."""
    knn = yaml.safe_load((ROOT / "conf/graph/knn.yaml").read_text())
    solver = yaml.safe_load((ROOT / "conf/solver/lobpcg.yaml").read_text())
    top = yaml.safe_load((ROOT / "conf/config.yaml").read_text())
    m = LDSC()
    b = m.builder
    for key in ("k_intra", "k_inter", "threshold", "heads", "search", "dim", "reduce", "list_size", "nprobe", "nlist",
                "hnsw_m", "ef_search", "ef_construction", "exact_max_tokens", "max_chunk_elements", "seed",
                "max_vectors_gb", "auto_dim"):
        assert getattr(b, key) == knn[key], key
    assert (m.tol, m.oversample, m.K, m.multilevel) == (solver["tol"], solver["oversample"], top["K"], solver["multilevel"])


def test_readme_library_snippet_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    snippet = next(b for b in blocks if "from ldsc import LDSC" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["model"].eigenvectors_.shape[1] == 15
    assert (tmp_path / "model.safetensors").is_file()


def test_importing_the_estimator_imports_neither_lightning_nor_hydra():
    code = ("import sys, ldsc; ldsc.LDSC; from ldsc import LDSC; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_import_ldsc_alone_is_light():
    code = "import sys, ldsc; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stdout + res.stderr
