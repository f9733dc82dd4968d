"""``backbone=fec``: FEC, the clustering network (:mod:`ldsc.features.backbones.fec_model`), behind
the backbone protocol.

Every cluster block's token mixer and every cluster-pooling layer is a layer here, named by its
parameter path (``network.0.2.token_mixer``: stage 1, block 3; ``network.1``: the pooling after
stage 1), on its input grid (56², 28², 14², 7² at 224 px). What each gives the graph types:

* ``f``, the model's own similarity space (the one it assigns points to centres with), as q *and*
  k: ``graph=qk`` (= ``kk`` = ``qq``) compares f with f;
* ``v``, the values each centre aggregates: ``graph=vv``;
* ``assign``, the index of the centre each point joined, per head (kept on the layer's features).

Weights: the official ImageNet-1k checkpoints are timm ``.pth.tar`` files (FEC-Small/Base/Large,
linked from github.com/guikunchen/FEC); ``backbone.checkpoint=/path/fec_small.pth.tar`` loads one
strictly (its ``state_dict``, else ``state_dict_ema``). ``backbone.pretrained=false`` builds random
weights (seeded; the log says so).
"""

from __future__ import annotations

import fnmatch
import logging
import os

import torch
from torch import Tensor

from ldsc.features.backbones.base import Backbone, LayerFeatures, WeightsNotFoundError, check_capture_options
from ldsc.errors import SettingError
from ldsc.features.backbones.loading import resolve_dtype
from ldsc.features.backbones.fec_model import FEC, IMAGENET_MEAN, IMAGENET_STD, VARIANTS, ClusterPool, ClusterRecord

log = logging.getLogger(__name__)

#: where the official checkpoints are listed
FEC_HOME = "https://github.com/guikunchen/FEC"


def read_checkpoint(path: str, key: str = "auto") -> dict:
    """The state dict inside a timm ``.pth.tar`` (``state_dict``, else ``state_dict_ema``, else the
    file is the state dict itself; ``key`` picks one), read without running code: the training
    arguments timm stores beside the weights (an ``argparse.Namespace``) are the one object allowed."""
    import argparse
    import pickle

    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"backbone.checkpoint '{path}' is not a file: pass the path of an official FEC "
                                   f"checkpoint (e.g. fec_small.pth.tar, linked from {FEC_HOME}).")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise WeightsNotFoundError(f"backbone.checkpoint '{path}' cannot be read as a PyTorch checkpoint of tensors "
                                   f"({str(err).splitlines()[0][:160]}).") from None
    if not isinstance(data, dict):
        raise WeightsNotFoundError(f"backbone.checkpoint '{path}' holds a {type(data).__name__}, not a state dict.")
    keys = ("state_dict", "state_dict_ema") if key == "auto" else (key,)
    for k in keys:
        if isinstance(data.get(k), dict):
            data = data[k]
            break
    else:
        if key != "auto":
            raise WeightsNotFoundError(f"backbone.checkpoint '{path}' has no '{key}' entry (it has: "
                                       f"{', '.join(sorted(map(str, data))[:8])}).")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in data.items()}


def load_weights(model: FEC, state: dict, variant: str, path: str) -> None:
    """``model.load_state_dict(state, strict=True)``, refused in one sentence when the file is
    another variant's or another network's."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        guess = [v for v in VARIANTS if v != variant and _fits(v, state)]
        hint = f"; it fits backbone.variant={guess[0]}" if guess else ""
        what = (f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else
                f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})" if unexpected else
                f"{len(shapes)} weights of another shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} in the file, "
                f"{tuple(own[shapes[0]].shape)} in FEC-{variant})")
        raise WeightsNotFoundError(f"backbone.checkpoint '{path}' is not an FEC-{variant} checkpoint: {what}{hint}.")
    model.load_state_dict(state, strict=True)


def _fits(variant: str, state: dict) -> bool:
    own = FEC.variant(variant).state_dict()
    return set(own) == set(state) and all(tuple(own[k].shape) == tuple(state[k].shape) for k in own)


class FECBackbone(Backbone):
    """Frozen FEC behind the backbone protocol (see the module docstring).

    Args:
        variant: ``small`` | ``base`` | ``large``.
        checkpoint: path of an official ``.pth.tar`` (or any file holding an FEC state dict).
        pretrained: ``false``: random weights (seeded by ``seed``) when no checkpoint is given.
        checkpoint_key: ``auto`` (``state_dict``, else ``state_dict_ema``) or the entry to read.
        layers: glob patterns over the layer names (``network.*.token_mixer``: the blocks only;
            ``network.1``: one pooling layer), or indices in execution order; ``None``: all.
        input_size: square side of the input (224: the checkpoints' resolution; a multiple of 32).
        heads, token_stride, dtype, draws, resize, crop: as for the other backbones.
        seed: seed of the random weights (``pretrained=false``).
    """

    name = "fec"

    def __init__(self, variant: str = "small", checkpoint: str | None = None, pretrained: bool = True,
                 checkpoint_key: str = "auto", layers=None, input_size: int = 224, heads: str = "keep",
                 token_stride: int = 1, dtype: str = "float32", draws: int = 1, resize: int | None = None,
                 crop: int | None = None, seed: int = 0):
        super().__init__()

        check_capture_options(heads, token_stride)
        if variant not in VARIANTS:
            raise SettingError(f"backbone.variant must be one of {', '.join(VARIANTS)}, not {variant!r}.")
        if int(input_size) % 32:
            raise SettingError(f"backbone.input_size={input_size} must be a multiple of 32 (the stem divides by 4, "
                             f"three poolings by 2 more).")
        self.set_view(resize, crop)
        self.variant, self.input_size, self.draws = variant, int(input_size), int(draws)
        self.head_mode, self.token_stride = heads, int(token_stride)
        self.dtype = resolve_dtype(dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.model = FEC.variant(variant)
            for m in self.model.modules():  # the definition's initialisation of the linear layers
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.trunc_normal_(m.weight, std=0.02)
                    torch.nn.init.zeros_(m.bias)
        if checkpoint:
            load_weights(self.model, read_checkpoint(str(checkpoint), checkpoint_key), variant, str(checkpoint))
            log.info("FEC-%s: weights from %s", variant, checkpoint)
        elif pretrained:
            raise WeightsNotFoundError(
                f"FEC's weights are not on a model hub: download the official FEC-{variant} checkpoint "
                f"(fec_{variant}.pth.tar, linked from {FEC_HOME}) and pass backbone.checkpoint=/path/fec_{variant}.pth.tar, "
                f"or set backbone.pretrained=false for random weights.")
        else:
            log.info("FEC-%s with random weights (backbone.pretrained=false, seed %d): its groupings show the "
                     "architecture, not what a trained network learned", variant, int(seed))
        self.model.to(self.dtype)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        every = self.model.clustering_layers()
        self.layer_names = select_layers(list(every), layers)
        self._layers = {n: every[n] for n in self.layer_names}
        self.freeze()

    def extract(self, images: Tensor, generator: torch.Generator | None = None) -> list[LayerFeatures]:
        x = ((images - self.mean) / self.std).to(self.dtype)
        for m in self._layers.values():
            m.records = []
        try:
            self.model.features(x)
            records = {n: m.records[0] for n, m in self._layers.items()}
        finally:
            for m in self._layers.values():
                m.records = None
        return [self.layer_features(n, r) for n, r in records.items()]

    @torch.no_grad()
    def pool_assignments(self, images: Tensor) -> tuple[tuple[int, int], list[Tensor]]:
        """The cluster poolings of ``images`` (``(B, 3, S, S)`` in [0, 1]): ``(the first pooling's
        input grid, [(B, h_s, w_s) centre index of every point, one per pooling, in order])`` —
        what :func:`ldsc.evaluation.clusters.chain_to_pixels` follows down to the pixels."""
        pools = [m for m in self.model.network if isinstance(m, ClusterPool)]
        for m in pools:
            m.records = []
        try:
            self.model.features(((images - self.mean) / self.std).to(self.dtype))
            records = [m.records[0] for m in pools]
        finally:
            for m in pools:
                m.records = None
        return tuple(records[0].assign.shape[-2:]), [r.assign[:, 0] for r in records]

    def layer_features(self, name: str, r: ClusterRecord) -> LayerFeatures:
        s = self.token_stride
        f, v, assign = r.f[:, :, ::s, ::s].float(), r.v[:, :, ::s, ::s].float(), r.assign[:, :, ::s, ::s]
        if self.head_mode == "mean":
            f, v = f.mean(1, keepdim=True), v.mean(1, keepdim=True)
        elif self.head_mode == "concat":
            B, e, h, w, d = f.shape
            f, v = (t.permute(0, 2, 3, 1, 4).reshape(B, 1, h, w, e * d) for t in (f, v))
        return LayerFeatures(name, q=f, k=f, v=v, assign=assign, centres=r.centres)


def select_layers(names: list[str], layers) -> list[str]:
    """The layer names ``layers`` picks (glob patterns or indices, in execution order; ``None``: all)."""
    if layers is None:
        return list(names)
    if isinstance(layers, (str, int)):
        layers = [layers]
    picked = set()
    for item in layers:
        if isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            i = int(item)
            if not -len(names) <= i < len(names):
                raise SettingError(f"backbone.layers index {i} is out of range: FEC has {len(names)} clustering layers.")
            picked.add(names[i])
        else:
            hits = fnmatch.filter(names, str(item))
            if not hits:
                raise SettingError(f"backbone.layers pattern {item!r} matches none of FEC's layers "
                                 f"(e.g. {names[0]}, {names[1]}; `python -m ldsc.layers backbone=fec backbone.pretrained=false` lists them).")
            picked.update(hits)
    return [n for n in names if n in picked]
