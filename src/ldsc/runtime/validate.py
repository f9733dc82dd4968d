"""Startup checks of the numeric knobs: one sentence per bad value, before any image is read.

Hydra gives every override as the type it parses (``K=2.5`` a float, ``K=abc`` a string), so each
knob's type and range are checked here rather than discovered later as a traceback or, worse, a
silently different run (``int(2.5) == 2``).
"""

from __future__ import annotations

from omegaconf import DictConfig

from ldsc.errors import ConfigError

GRAPH_HEADS = ("concat", "mean", "separate")


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def _integer(cfg, key: str, minimum: int, optional: bool = False, hint: str = "") -> None:
    v = _get(cfg, key)
    if v is None:
        if optional:
            return
        raise ConfigError(f"{key} must be set to a whole number{hint}.")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key} must be a whole number, not {v!r}{hint}.")
    if v < minimum:
        raise ConfigError(f"{key}={v} must be at least {minimum}{hint}.")


def _number(cfg, key: str, low: float | None = None, high: float | None = None, hint: str = "") -> None:
    v = _get(cfg, key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, not {v!r}{hint}.")
    if (low is not None and v < low) or (high is not None and v >= high):
        rng = f"in [{low}, {high})" if low is not None and high is not None else (f"at least {low}" if low is not None else f"below {high}")
        raise ConfigError(f"{key}={v} must be {rng}{hint}.")


#: how to fill the values a config leaves mandatory (``???``)
MISSING_HINTS = {"data.path": "data.path=/path/to/image.jpg (data=single: one image)",
                 "data.root": "data.root=/path/to/folder (data=folder: every image in it)",
                 "backbone.model_id": "backbone.model_id=<hub id or local folder> (e.g. facebook/dinov2-base)"}
REDUCTIONS = ("pca", "random")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`~ldsc.errors.ConfigError` (one sentence) for the first bad knob of ``cfg``."""
    from omegaconf import OmegaConf

    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        key = missing[0]
        raise ConfigError(f"{key} is not set: pass {MISSING_HINTS.get(key, key + '=...')}.")
    accelerator = str(_get(cfg, "trainer.accelerator") or "")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but torch sees no CUDA GPU here: use trainer=cpu, "
                              f"or a CUDA build of torch on a GPU machine.")
    _several_processes(cfg)
    _integer(cfg, "K", 1)
    _integer(cfg, "seed", 0)
    hugepages = _get(cfg, "numpy_hugepages")
    if hugepages is not None and not isinstance(hugepages, bool):
        raise ConfigError(f"numpy_hugepages must be true, false or null, not {hugepages!r}.")
    _integer(cfg, "base_size", 2, optional=True)
    _integer(cfg, "trainer.max_epochs", 1, hint=" (the solver's steps)")
    _integer(cfg, "data.batch_size", 1, optional=True)
    _integer(cfg, "data.limit", 1, optional=True)
    _integer(cfg, "data.num_workers", 0, optional=True)
    _integer(cfg, "backbone.draws", 1, optional=True)
    graph = _get(cfg, "graph")
    if graph is not None and "k_intra" in graph:
        _integer(cfg, "graph.k_intra", 0)
        _integer(cfg, "graph.k_inter", 0)
        if graph.k_intra == 0 and graph.k_inter == 0:
            raise ConfigError("graph.k_intra and graph.k_inter are both 0: the graphs would have no edges.")
        _number(cfg, "graph.threshold", -1.0, 1.0, hint=" (similarities are cosines; at or below it edges are dropped)")
        if graph.get("heads") not in GRAPH_HEADS:
            raise ConfigError(f"graph.heads must be one of {list(GRAPH_HEADS)}, not {graph.get('heads')!r}.")
        for key in ("list_size", "nprobe", "max_chunk_elements"):
            if key in graph:
                _integer(cfg, f"graph.{key}", 1)
        _integer(cfg, "graph.exact_max_tokens", 0, optional=True)
        _integer(cfg, "graph.gpu_exact_max_tokens", 0, optional=True)
        if graph.get("dim") is not None and graph.get("dim") != "auto":
            _integer(cfg, "graph.dim", 1, hint=" (or auto, or null)")
        if "auto_dim" in graph:
            _integer(cfg, "graph.auto_dim", 1)
        if "max_vectors_gb" in graph:
            _number(cfg, "graph.max_vectors_gb", 0.001, None)
        from ldsc.graphs.search import SEARCH_METHODS

        if "search" in graph and graph.search not in SEARCH_METHODS:
            raise ConfigError(f"graph.search must be one of {list(SEARCH_METHODS)}, not {graph.search!r}.")
        if "reduce" in graph and graph.reduce not in REDUCTIONS:
            raise ConfigError(f"graph.reduce must be one of {list(REDUCTIONS)}, not {graph.reduce!r}.")
    solver = _get(cfg, "solver")
    if solver is not None:
        if "tol" in solver:
            _number(cfg, "solver.tol", 0.0)
        if "iters_per_step" in solver:
            _integer(cfg, "solver.iters_per_step", 1)
        if "oversample" in solver:
            _integer(cfg, "solver.oversample", 0)


def runs_on_several_processes(cfg) -> bool:
    """Whether ``cfg`` asks for several processes: ``trainer.devices > 1`` (or a device list such as
    ``-1``) or ``trainer.num_nodes > 1``."""
    devices, nodes = _get(cfg, "trainer.devices"), _get(cfg, "trainer.num_nodes") or 1
    return (isinstance(devices, int) and not isinstance(devices, bool) and devices > 1) or \
        (isinstance(nodes, int) and nodes > 1) or (isinstance(devices, str) and devices not in ("1", "auto"))


def _several_processes(cfg) -> None:
    """A run on several processes needs the sharded strategy and a solver that shards its rows
    (the default one)."""
    if not runs_on_several_processes(cfg):
        return
    devices = _get(cfg, "trainer.devices")
    solver = _get(cfg, "solver")
    target = str(solver.get("_target_", "")) if solver is not None else ""
    if target and not target.endswith("LobpcgSolver"):
        raise ConfigError(f"solver={target.rsplit('.', 1)[-1]} runs in one process only: use the default solver "
                          f"(solver=lobpcg) with trainer.devices > 1, or set trainer.devices=1.")
    strategy = _get(cfg, "trainer.strategy")
    if not (hasattr(strategy, "get") and str(strategy.get("_target_", "")).endswith("ShardedDDPStrategy")):
        raise ConfigError(f"trainer.devices={devices} needs the sharded strategy: use trainer=ddp (GPUs) or "
                          f"trainer=ddp_cpu (CPU processes) rather than trainer.strategy={strategy}.")
