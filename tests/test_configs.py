"""The configs are the interface: every ldsc class's defaults equal its yaml's (a notebook user
gets the same algorithm as a CLI user), and every choice of the cheap groups instantiates."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldsc.run import config_dir

CONF = Path(config_dir())
#: presets that deliberately set other values than their class's defaults
PRESETS = {"experiment", "solver/paper_single.yaml"}


def _targets(node, where=""):
    """``(where, node)`` for every mapping with an ldsc ``_target_`` inside ``node``."""
    if isinstance(node, dict):
        if str(node.get("_target_", "")).startswith("ldsc."):
            yield where, node
        for k, v in node.items():
            yield from _targets(v, f"{where}.{k}")


def _parameters(obj) -> dict:
    """The keyword parameters of a class (following ``**kwargs`` up to its bases) or a function."""
    if not inspect.isclass(obj):
        return dict(inspect.signature(obj).parameters)
    merged = {}
    for klass in obj.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__)
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                merged.setdefault(name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return merged


def _config_files():
    for f in sorted(CONF.rglob("*.yaml")):
        rel = f.relative_to(CONF).as_posix()
        if rel.split("/")[0] in PRESETS or rel in PRESETS:
            continue
        yield rel


@pytest.mark.parametrize("rel", list(_config_files()))
def test_code_defaults_equal_the_yaml(rel):
    data = OmegaConf.to_container(OmegaConf.load(CONF / rel), resolve=False)
    for where, node in _targets(data):
        module, _, name = node["_target_"].rpartition(".")
        params = _parameters(getattr(importlib.import_module(module), name))
        for key, value in node.items():
            if key.startswith("_") or isinstance(value, (dict, list)) or (isinstance(value, str) and
                                                                           ("${" in value or value == "???")):
                continue
            p = params.get(key)
            assert p is not None, f"{rel}{where}: {key} is not a parameter of {node['_target_']}"
            if p.default is not inspect.Parameter.empty:
                assert p.default == value, f"{rel}{where}: {key} is {value!r} in the yaml, {p.default!r} in the code"


@pytest.mark.parametrize("group", ["graph", "solver", "data", "store"])
def test_every_choice_of_the_cheap_groups_instantiates(compose, group):
    from hydra.utils import instantiate

    for f in sorted((CONF / group).glob("*.yaml")):
        fill = {"single": ["data.path=/tmp/x.jpg"], "folder": ["data.root=/tmp"]}.get(f.stem, []) if group == "data" else []
        cfg = compose([f"{group}={f.stem}", *fill])
        node = cfg[group]
        kwargs = {"n_images": 2, "K": 4, "base_size": 16} if group == "solver" else {}
        obj = instantiate(node, **kwargs)
        assert type(obj).__module__.startswith("ldsc."), f.stem


def test_folder_recursive_switch(tmp_path):
    """data.recursive: images in subfolders are found unless it is false."""
    from PIL import Image

    from ldsc.runtime.data import FolderDataModule

    (tmp_path / "sub").mkdir()
    for p in (tmp_path / "a.png", tmp_path / "sub" / "b.png"):
        Image.new("RGB", (8, 8)).save(p)
    assert [Path(f).name for f in FolderDataModule(str(tmp_path)).find_images()] == ["a.png", "b.png"]
    assert [Path(f).name for f in FolderDataModule(str(tmp_path), recursive=False).find_images()] == ["a.png"]


def test_paper_presets_run_the_papers_recipe_or_say_what_they_run_instead(compose):
    """A `paper_*` preset either selects the paper's solver (itself or through the preset it
    builds on) or says, in its header, that the default solver runs instead and how to get the
    paper's recipe."""
    for f in sorted((CONF / "experiment").glob("paper_*.yaml")):
        text = f.read_text()
        cfg = compose([f"experiment={f.stem}", "++data.path=/tmp/x.jpg"])
        if not cfg.solver._target_.endswith("PaperSolver"):
            assert "default solver" in text and "solver=paper" in text, f.name


def test_docs_stand_alone():
    """The project's docs and code cite its own pages, never notes kept outside the repository."""
    repo = CONF.parent
    files = [repo / "README.md", *(repo / "docs").glob("*.md"), *(repo / "src").rglob("*.py"), *CONF.rglob("*.yaml")]
    for f in files:
        assert "DESIGN" not in f.read_text(), f
    readme = (repo / "README.md").read_text()
    assert "docs/benchmarks.md" in readme and "docs/method.md" in readme


def test_whole_data_set_solvers_named_in_run_are_those_of_the_configs():
    """run.py builds the features and graphs before importing Lightning for the solvers it names as
    whole-data-set ones: the names must be exactly the configs' solvers whose graph_scope is dataset."""
    import yaml
    from hydra.utils import get_class

    from ldsc.run import WHOLE_DATA_SET_SOLVERS

    docs = [yaml.safe_load(p.read_text()) for p in (Path(config_dir()) / "solver").glob("*.yaml")]
    targets = {d["_target_"] for d in docs if "_target_" in d}  # (the others extend one of these)
    assert set(WHOLE_DATA_SET_SOLVERS) == {t for t in targets if get_class(t).graph_scope == "dataset"}


def test_data_modules_build_features_and_graphs_without_lightning(tmp_path):
    """The data stage imports no Lightning (so run.py overlaps Lightning's import with it), and the
    Lightning view of a built data module shares its state."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from ldsc.runtime.data import SamplesDataModule\n"
        "from ldsc.features.backbones.pixel import PixelBackbone\n"
        "from ldsc.graphs.knn import KnnGraphBuilder\n"
        "from ldsc.features.store import StoreOptions\n"
        "dm = SamplesDataModule(names=['astronaut.png', 'coffee.png'])\n"
        f"dm.attach(PixelBackbone(n_features=8), KnnGraphBuilder(pair='vv'), 16, store=StoreOptions(dir={str(tmp_path)!r}), graph_config={{'k': 1}})\n"
        "dm.build()\n"
        "assert 'lightning' not in sys.modules, 'the data stage imported Lightning'\n"
        "from ldsc.runtime.data import as_lightning\n"
        "import lightning as L\n"
        "lm = as_lightning(dm)\n"
        "assert isinstance(lm, L.LightningDataModule) and isinstance(lm, SamplesDataModule)\n"
        "assert lm.graphs is dm.graphs and lm.stages is dm.stages and lm.trainer is None\n"
        "assert [g.grid for g in lm.graphs] == [(16, 16), (8, 8), (4, 4)]\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
