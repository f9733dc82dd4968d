"""The feature store: written once, reused, rebuilt when asked or when the images change."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY

from ldsc.features.backbones.pixel import PixelBackbone
from ldsc.errors import ConfigError
from ldsc.run import build_datamodule
from ldsc.features.store import FeatureStore, StoreOptions, open_or_build


class CountingPixel(PixelBackbone):
    """The pixel backbone, counting its forward passes."""

    calls = 0

    def extract(self, images, generator=None):
        CountingPixel.calls += len(images)
        return super().extract(images, generator)


def sample_files(n=3):
    import skimage.data
    from pathlib import Path

    folder = Path(skimage.data.__file__).parent
    return [str(folder / f) for f in ("astronaut.png", "coffee.png", "chelsea.png")[:n]]


def test_store_is_reused_rebuilt_on_request_and_when_a_file_changes(tmp_path):
    files = sample_files()
    bb = CountingPixel()
    bb.set_base_size(16)
    opts = StoreOptions(dir=str(tmp_path / "store"))
    CountingPixel.calls = 0
    s1 = open_or_build(opts, files, bb, {"name": "pixel"}, 16, ["v"], batch_size=2)
    assert CountingPixel.calls == 3 and s1.n_images == 3
    s2 = open_or_build(opts, files, bb, {"name": "pixel"}, 16, ["v"], batch_size=2)
    assert CountingPixel.calls == 3 and s2.path == s1.path  # reused: no backbone pass
    assert torch.equal(s2.vectors(0, "v"), s1.vectors(0, "v"))
    open_or_build(StoreOptions(dir=opts.dir, rebuild=True), files, bb, {"name": "pixel"}, 16, ["v"])
    assert CountingPixel.calls == 6
    # another setting, or a touched file, is another store
    s3 = open_or_build(opts, files, bb, {"name": "pixel", "sigma_xy": 0.3}, 16, ["v"])
    assert s3.path != s1.path and CountingPixel.calls == 9
    local = [str(tmp_path / f"img{i}.png") for i in range(2)]
    for src, dst in zip(files, local):
        with open(src, "rb") as a, open(dst, "wb") as b:
            b.write(a.read())
    s4 = open_or_build(opts, local, bb, {"name": "pixel"}, 16, ["v"])
    os.utime(local[0], ns=(0, 10**9))
    s5 = open_or_build(opts, local, bb, {"name": "pixel"}, 16, ["v"])
    assert s5.path != s4.path


def test_store_holds_fp16_vectors_per_layer_and_draw(tmp_path):
    files = sample_files(2)
    bb = PixelBackbone(draws=2)
    bb.set_base_size(16)
    store = open_or_build(StoreOptions(dir=str(tmp_path)), files, bb, {}, 16, ["q", "v"])
    arr = store.array(0, "v")
    assert arr.dtype == np.float16 and arr.shape[:2] == (2, 2)
    assert [layer["grid"] for layer in store.layers] == [[16, 16], [8, 8], [4, 4]]
    fresh = bb(torch.stack([__import__("ldsc.runtime.data", fromlist=["x"]).image_tensor(f, bb.input_size) for f in files]))
    assert torch.allclose(store.vectors(1, "q"), fresh[1].q, atol=2e-3)
    feats = store.features([1, 0])  # any order
    assert torch.allclose(feats[0].v[0], store.vectors(0, "v", images=[1])[0])
    with pytest.raises(ConfigError, match="holds"):
        store.array(0, "k")
    assert FeatureStore.is_complete(store.path)


def test_an_interrupted_store_is_rebuilt(tmp_path):
    files = sample_files(2)
    bb = CountingPixel()
    bb.set_base_size(16)
    opts = StoreOptions(dir=str(tmp_path))
    store = open_or_build(opts, files, bb, {}, 16, ["v"])
    (store.path / "meta.json").unlink()  # as if killed before the end
    CountingPixel.calls = 0
    open_or_build(opts, files, bb, {}, 16, ["v"])
    assert CountingPixel.calls == 2


def test_second_run_reuses_the_store_and_does_not_call_the_backbone(compose, tmp_path, monkeypatch):
    from ldsc.run import fit

    cfg = compose(TINY, out=tmp_path / "first")
    fit(cfg)
    calls = []
    monkeypatch.setattr(PixelBackbone, "extract", lambda self, *a, **k: calls.append(1))
    cfg = compose(TINY, out=tmp_path / "second")
    dm, _ = build_datamodule(cfg)
    dm.setup()
    assert not calls and dm.store.n_images == 2
    cfg = compose([*TINY, "store.rebuild=true"], out=tmp_path / "third")
    dm, _ = build_datamodule(cfg)
    with pytest.raises(Exception):
        dm.setup()  # the patched backbone returns nothing: it was called
    assert calls


def test_a_run_that_would_not_fit_in_memory_stops_with_one_sentence(compose, monkeypatch):
    from ldsc.run import fit

    monkeypatch.setattr(PixelBackbone, "pass_bytes", lambda self, batch: None)  # the graphs' check, not the pass's

    cfg = compose([*TINY, "data.memory_limit_gb=0.001"])
    with pytest.raises(ConfigError, match=r"This run needs about .* GB .* but 0\.0 GB are available: lower "
                                          r"graph.k_intra/graph.k_inter, set graph.dim"):
        fit(cfg)


def test_a_store_written_with_its_maps_reopened_every_few_bytes_is_the_same(tmp_path, monkeypatch, coco_dir):
    """The writer unmaps its files every UNMAP_EVERY_BYTES (so written pages leave its resident
    memory): reopening after every batch writes the same store as never reopening."""
    import ldsc.features.store as st
    from ldsc.features.backbones.pixel import PixelBackbone

    files = sorted(str(p) for p in coco_dir.glob("*.jpg"))[:12]
    bb = PixelBackbone(n_features=16)
    bb.set_base_size(16)
    monkeypatch.setattr(st, "UNMAP_EVERY_BYTES", 1000)
    often = st.build_store(tmp_path / "often", files, bb, ["v"], batch_size=4, progress=False)
    monkeypatch.setattr(st, "UNMAP_EVERY_BYTES", 1 << 40)
    never = st.build_store(tmp_path / "never", files, bb, ["v"], batch_size=4, progress=False)
    for li in range(len(never.layers)):
        assert torch.equal(often.vectors(li, "v"), never.vectors(li, "v"))
