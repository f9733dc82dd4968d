"""The Hydra entry point: compose -> build -> fit -> export -> figures.

    python -m ldsc.run backbone=pixel graph=qk K=15
    python -m ldsc.run -m backbone=pixel graph=qk,vv K=5,10

Configs live in the top-level ``conf/`` folder (``LDSC_CONF_DIR`` overrides it). Every piece is
built by ``hydra.utils.instantiate`` from its config group; this file holds no maths.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ldsc.atomic import folder_lock
from ldsc.runtime.run_folder import refuse_overwrite, remove_stub_folder
from ldsc.errors import ConfigError, LdscError
from ldsc.interrupt import graceful_signals, hold_signals, release_signals
from ldsc.runtime.validate import validate

log = logging.getLogger("ldsc")
# FAISS reports at INFO which CPU build it loaded (and a failed AVX2 probe) on every import
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def config_dir() -> str:
    """Absolute path of the config folder: ``$LDSC_CONF_DIR``, else the package's own ``conf``
    (an installed wheel: pyproject.toml ships the repository's ``conf/`` as ``ldsc/conf``), else
    ``<repo>/conf`` (a source checkout or an editable install)."""
    env = os.environ.get("LDSC_CONF_DIR")
    if env:
        return str(Path(env))
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if (packaged / "config.yaml").is_file() else here.parents[1] / "conf")


def base_grid(cfg: DictConfig, n_images: int) -> int:
    """The base grid side: ``cfg.base_size`` or 64 for one image and 32 for a data set."""
    base = cfg.get("base_size") or (64 if n_images == 1 else 32)
    if int(cfg.K) >= base * base:
        raise ConfigError(f"K={cfg.K} must be smaller than the {base}x{base}={base * base} pixels of the base grid "
                          f"(lower K or raise base_size).")
    if int(cfg.K) < 1:
        raise ConfigError(f"K={cfg.K} must be at least 1.")
    return int(base)


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """``cfg.ckpt_path`` if set, else ``<output_dir>/checkpoints/last.ckpt`` when ``cfg.resume``."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"Checkpoint '{path}' does not exist.")
        return str(path)
    if cfg.get("resume"):
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if path.is_file():
            log.info("resuming from %s", path)
            return str(path)
        log.info("resume=true but %s does not exist yet: starting fresh", path)
    return None


def run_signature(cfg: DictConfig, files: list[str], base: int) -> dict:
    """What a run's result depends on and a resume must not change: the images (path, size, time
    and content), the backbone, graph and store settings, K, the base grid, the seed and the solver."""
    import hashlib
    import json

    from ldsc.features.store import file_identity

    images = hashlib.sha256(json.dumps([file_identity(f) for f in files]).encode()).hexdigest()[:20]
    plain = lambda node: OmegaConf.to_container(node, resolve=True) if node is not None else None  # noqa: E731
    return json.loads(json.dumps({
        "images": {"count": len(files), "hash": images}, "backbone": plain(cfg.get("backbone")),
        "graph": plain(cfg.get("graph")), "store": {"dtype": cfg.store.get("dtype")} if cfg.get("store") else None,
        "K": int(cfg.K), "base_size": int(base), "seed": int(cfg.seed),
        "solver": str(cfg.solver.get("_target_", "")) if cfg.get("solver") else None}, default=str))


def _differences(a, b, prefix: str = "") -> list[str]:
    """``key: theirs -> ours`` for every leaf where two signatures differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def check_checkpoint(path: str, solver, signature: dict | None = None, max_epochs: int | None = None) -> None:
    """Refuse, in one sentence, a checkpoint that cannot be read safely (``weights_only``), is
    corrupt, was written by a run with other images, settings (``signature``, see
    :func:`run_signature`), K or base grid than ``solver``, or has run more epochs than ``max_epochs``."""
    import pickle

    import torch

    try:
        whole = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = whole["state_dict"]
    except pickle.UnpicklingError as e:
        raise ConfigError(f"Checkpoint '{path}' holds objects other than tensors and plain containers, so it was "
                          f"not loaded (loading it could run code): {str(e).splitlines()[0][:160]}") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise ConfigError(f"Checkpoint '{path}' is not a readable ldsc checkpoint (truncated or corrupt: "
                          f"{str(e).splitlines()[0][:160]}); delete it to start over, or pass another ckpt_path.") from None
    own = solver.state_dict()
    left_out = getattr(solver, "ITERATION_STATE", ())  # (0, m) in a converged solver's checkpoint
    for name, t in own.items():
        if name in left_out and name in state and tuple(state[name].shape) == (0, *t.shape[1:]):
            continue
        if name in state and tuple(state[name].shape) != tuple(t.shape):
            raise ConfigError(f"Checkpoint '{path}' was written by a different run ({name} is "
                              f"{tuple(state[name].shape)}, this run's is {tuple(t.shape)}: other images, K, base_size "
                              f"or solver settings): resume with the same settings, or use a fresh hydra.run.dir.")
    missing = sorted(set(own) - set(state))
    if missing:
        raise ConfigError(f"Checkpoint '{path}' was written by another solver (it lacks {', '.join(missing[:3])}): "
                          f"resume with the same solver=, or use a fresh hydra.run.dir.")
    theirs = (whole.get("callbacks") or {}).get("SolverCheckpoint", {}).get("signature")
    if signature is not None and theirs:
        diff = _differences(theirs, signature)
        if diff:
            what = "other images" if any(d.startswith("images.") for d in diff) else "other settings"
            raise ConfigError(f"Checkpoint '{path}' was written by a run with {what} ({'; '.join(diff[:3])}"
                              f"{'; ...' if len(diff) > 3 else ''}): resume with the same settings, or start a new "
                              f"run in a fresh hydra.run.dir.")
    elif signature is not None:
        log.warning("checkpoint %s records no settings (written by an older ldsc): resuming without checking them", path)
    epoch = whole.get("epoch")
    if max_epochs is not None and max_epochs > 0 and isinstance(epoch, int) and epoch > max_epochs:
        raise ConfigError(f"Checkpoint '{path}' was saved at epoch {epoch}, beyond trainer.max_epochs={max_epochs}: "
                          f"to continue it, set trainer.max_epochs above {epoch}.")


def solver_class(cfg: DictConfig):
    """The solver class named by ``cfg.solver._target_`` (not instantiated)."""
    from hydra.utils import get_class

    return get_class(cfg.solver._target_)


#: solvers whose graphs are the whole data set's (``graph_scope`` ``dataset``; a test checks the
#: classes agree): their runs build the features and graphs before Lightning is imported
WHOLE_DATA_SET_SOLVERS = ("ldsc.solvers.lobpcg.LobpcgSolver", "ldsc.solvers.exact.ExactSolver")


def builds_before_lightning(cfg: DictConfig) -> bool:
    """Whether this run computes its features and graphs before importing Lightning:
    one process on the CPU (Lightning would pick no accelerator) with a whole-data-set solver.
    (Elsewhere the trainer decides the device and the processes first.)"""
    import torch

    from ldsc.distributed import launch_rank, world_size

    t = cfg.trainer
    one_process = (world_size() == 1 and launch_rank() == 0 and str(t.get("devices", 1)) in ("1", "auto")
                   and int(t.get("num_nodes", 1)) == 1 and "strategy" not in t)
    accelerator = str(t.get("accelerator", "auto"))
    cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                   and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()))
    return one_process and cpu and cfg.solver._target_ in WHOLE_DATA_SET_SOLVERS


def build_datamodule(cfg: DictConfig, scope: str | None = None):
    """The data module of ``cfg`` with its frozen backbone, graph builder and feature store
    attached, and the side of the base grid: ``(datamodule, base)``. ``scope``: the solver's
    ``graph_scope`` (default: read from its class, which imports Lightning)."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    base = base_grid(cfg, datamodule.num_images)
    log.info("%d image(s), base grid %dx%d, K=%d", datamodule.num_images, base, base, cfg.K)
    datamodule.attach(instantiate(cfg.backbone), instantiate(cfg.graph), base, seed=int(cfg.seed),
                      scope=scope or solver_class(cfg).graph_scope, store=instantiate(cfg.store),
                      backbone_config=OmegaConf.to_container(cfg.backbone, resolve=True),
                      graph_config=OmegaConf.to_container(cfg.graph, resolve=True))
    return datamodule, base


def fit(cfg: DictConfig):
    """Check ``cfg``, take the output folder's lock, build everything and fit; returns the trained solver.
    (A run on several processes: the launching process holds the lock for all of them.)"""
    from ldsc.distributed import launch_rank

    validate(cfg)
    if launch_rank() != 0:
        return _fit(cfg)
    with folder_lock(cfg.paths.output_dir):
        refuse_overwrite(cfg.paths.output_dir, resume=bool(cfg.get("resume") or cfg.get("ckpt_path")),
                         overwrite=bool(cfg.get("overwrite")))
        return _fit(cfg)


def quiet_lightning() -> None:
    """One line per message, and only messages that mean something: Lightning's loggers print
    through their own handler *and* Hydra's (every line twice), announce "GPU available: False"
    and a cloud-logging tip on every run, and warn that a solver without an optimiser has none."""
    import warnings

    if logging.getLogger().handlers:  # Hydra's (or the user's) root handler prints them once
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*configure_optimizers` returned `None`")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning vs newer torch


def _fit(cfg: DictConfig):
    with graceful_signals():  # from the first image read on: a signal ends the run in one sentence
        return _fit_inside(cfg)


def _fit_inside(cfg: DictConfig):
    from hydra.utils import instantiate

    from ldsc.distributed import launch_rank
    from ldsc.profiling import numpy_hugepages, stage

    numpy_hugepages(cfg.get("numpy_hugepages"))
    if launch_rank() != 0:  # the other processes of a run on several: warnings and errors only, no repeats
        logging.getLogger("ldsc").setLevel(logging.WARNING)
    stages: dict = {}
    fit_stage = stage("fit", stages)  # from the first data work to the end of the export
    fit_stage.__enter__()
    early = builds_before_lightning(cfg)
    if early:
        # the features and graphs before Lightning (3 s of imports): a problem with the data or the
        # graphs is reported without waiting for it. (Importing Lightning in a thread meanwhile was
        # tried: it competed with the graph stage for the cores, and two threads importing at once
        # can meet a package half initialised — scipy's `_lib`, once in the test suite.)
        seed_everything(int(cfg.seed))
        datamodule, base = build_datamodule(cfg, scope="dataset")
        datamodule.stages = stages
        datamodule.background_writes = True  # the graph store is written while Lightning is imported
        datamodule.build(finish_graphs_in_background=True)  # and the lists symmetrised (no Python in it)
    import lightning as L

    quiet_lightning()
    if early:  # the symmetrisations that ran beside the import: joined (and their errors reported) here
        datamodule.dataset_graphs()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if not early:
        datamodule, base = build_datamodule(cfg)
        datamodule.stages = stages
    return _fit_lightning(cfg, datamodule, base, L, instantiate, lambda: fit_stage.__exit__(None, None, None))


def seed_everything(seed: int) -> None:
    """The seeds ``lightning.seed_everything`` sets (Python, NumPy, torch), before Lightning is imported."""
    import random

    import numpy as np
    import torch

    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fit_lightning(cfg: DictConfig, datamodule, base: int, L, instantiate, end_fit_stage):
    from ldsc.runtime.callbacks import ExportEigenvectors, StageTimer
    from ldsc.runtime.data import as_lightning

    datamodule = as_lightning(datamodule)
    datamodule.background_writes = True  # the graph store is written while the solver starts
    n_images = datamodule.num_images
    solver = instantiate(cfg.solver, n_images=n_images, K=int(cfg.K), base_size=base)
    # the solver's state with an optimiser's two moments and the gradient (the memory check counts it)
    datamodule.solver_state_bytes = 4 * sum(t.numel() * t.element_size() for t in solver.state_dict().values())

    resolved = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    from lightning.pytorch.callbacks import ProgressBar

    if not cfg.trainer.get("enable_progress_bar", True):  # (Lightning refuses a progress bar callback then)
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # the solver's bar first: it closes when the solver stops, before the export's work
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    callbacks = [StageTimer(datamodule.stages, "solve"), *bars, *(c for c in callbacks if c not in bars),
                 StageTimer(datamodule.stages, "export")]
    from ldsc.runtime.callbacks import SolverCheckpoint

    signature = run_signature(cfg, datamodule.prepare_files(), base)
    for cb in callbacks:
        if isinstance(cb, ExportEigenvectors):
            cb.run_config = resolved
        if isinstance(cb, SolverCheckpoint):
            cb.signature = signature
    loggers = [instantiate(lg, **keep_earlier_logs(lg)) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(resolved)
    try:
        ckpt = checkpoint_to_resume(cfg)
        if ckpt:
            check_checkpoint(ckpt, solver, signature, cfg.trainer.get("max_epochs"))
        trainer.fit(solver, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        end_fit_stage()
        datamodule.wait_for_writes()  # the graph store, written while the solver ran
        datamodule.stages["held_mb"] = held_memory(datamodule.graphs, solver)
        if trainer.world_size > 1:  # each process's own seconds and peak memory
            write_stages(cfg.paths.output_dir, datamodule.stages, f"stages.rank{trainer.global_rank}.json")
        if trainer.is_global_zero:
            write_stages(cfg.paths.output_dir, datamodule.stages)
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()
    log.info("outputs in %s", cfg.paths.output_dir)
    return solver


def keep_earlier_logs(logger_cfg) -> dict:
    """Overrides for a CSV logger whose folder already holds a ``metrics.csv`` (a resumed run, or a
    second run in the folder): Lightning would delete that file, so the new metrics go to the first
    free ``resume<i>`` subfolder instead and the earlier run's stay as they were."""
    from ldsc.distributed import launch_rank

    if not str(logger_cfg.get("_target_", "")).endswith("CSVLogger") or launch_rank() != 0:
        return {}  # (only rank 0 of a run on several processes writes logs)
    base = Path(str(logger_cfg.get("save_dir", "."))) / str(logger_cfg.get("name") or "")
    version = logger_cfg.get("version")
    if version is None or not (base / str(version) / "metrics.csv").exists():
        return {}
    i = 1
    while (base / f"resume{i}").exists():
        i += 1
    log.info("keeping the earlier %s; this run's metrics go to %s", base / str(version) / "metrics.csv",
             base / f"resume{i}")
    return {"version": f"resume{i}"}


def held_memory(graphs, solver) -> dict:
    """MB this process holds in graphs and in the solver's state (its share on several processes)."""
    mb = 2**20
    return {"graphs": round(sum(g.nbytes() for g in graphs or [] if hasattr(g, "nbytes")) / mb, 3),
            "solver": round(sum(t.numel() * t.element_size() for t in solver.state_dict().values()) / mb, 3)}


def write_stages(out_dir: str, stages: dict, name: str = "stages.json") -> None:
    """``<out_dir>/<name>``: seconds and peak memory of each stage (features, graphs, fit)."""
    import json

    from ldsc.atomic import atomic_write_text

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / name, json.dumps(stages, indent=1))
    if name != "stages.json":  # a process's own copy on several processes: said once, by stages.json
        return
    log.info("stages: %s", ", ".join(f"{k} {v['seconds']:.1f} s / {v['peak_rss_mb']:.0f} MB" for k, v in stages.items()
                                     if "seconds" in v))


def user_error(err: BaseException) -> LdscError | None:
    """The :class:`LdscError` behind ``err``, if any: Hydra's ``instantiate`` and Lightning wrap
    the exceptions raised inside them, so the chain of causes is searched."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LdscError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def unwritable_output(argv: list[str]) -> str | None:
    """A sentence when the folder a run would write to (``hydra.run.dir`` / ``hydra.sweep.dir``
    or ``paths.log_dir`` / ``paths.root_dir`` from the command line, else ``./outputs``) cannot be
    created or written, checked before Hydra creates it; ``None`` when it can."""
    given = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    root = given.get("paths.root_dir", os.environ.get("LDSC_ROOT", "."))
    folder = (given.get("hydra.run.dir") or given.get("hydra.sweep.dir") or given.get("paths.log_dir")
              or str(Path(root) / "outputs"))
    if "${" in folder:  # an interpolation: resolved by Hydra, not checked here
        return None
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"The output folder '{folder}' cannot be created: '{p}' is a file, not a folder."
    if not os.access(p, os.W_OK | os.X_OK):
        return f"The output folder '{folder}' cannot be written: '{p}' is not writable; choose another with hydra.run.dir=..."
    return None


def closest_name(name: str, candidates) -> str | None:
    """The candidate ``name`` most likely misspells: the same name in another case, else the
    closest by ``difflib`` (``None`` when none is close)."""
    import difflib

    candidates = sorted(candidates)
    same = [c for c in candidates if c.lower() == name.lower()]
    close = same or difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return close[0] if close else None


def misspelt_override(argv: list[str], conf: str | None = None) -> str | None:
    """A sentence for an override whose first name is neither a config group nor a top-level key
    (``grpah=vv``, ``grpah.k_inter=5``), naming the closest valid one; ``None`` when all are known.
    (Hydra's own advice for these, "append with +grpah=vv", would add a key nothing reads.)"""
    import yaml

    folder = Path(conf or config_dir())
    groups = sorted(p.name for p in folder.iterdir() if p.is_dir())
    try:
        keys = sorted(k for k in (yaml.safe_load((folder / "config.yaml").read_text()) or {}) if k != "defaults")
    except (OSError, yaml.YAMLError):
        return None
    for arg in argv:  # an experiment (@package _global_) may add top-level settings of its own
        if arg.startswith("experiment="):
            try:
                extra = yaml.safe_load((folder / "experiment" / f"{arg.split('=', 1)[1]}.yaml").read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            keys = sorted(set(keys) | {k for k in extra if k != "defaults"})
    known = set(groups) | set(keys) | {"hydra"}
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        name, value = arg.split("=", 1)
        first = name.split(".", 1)[0].split("/", 1)[0]
        if not first or first in known:
            continue
        close = closest_name(first, known - {"hydra"})
        hint = f"did you mean {name.replace(first, close, 1)}={value}? " if close else ""
        return (f"'{first}' is neither a config group nor a setting: {hint}(groups: {', '.join(groups)}; "
                f"top-level settings: {', '.join(keys)}; `python -m ldsc.run --help` lists them).")
    return None


def unknown_choice(argv: list[str], conf: str | None = None) -> str | None:
    """A sentence for ``group=option`` naming an option the group does not have (``backbone=dinov3``),
    with the closest and all known ones; ``None`` when all are known. Several options (a sweep's
    ``graph=qk,vv``) are each checked."""
    folder = Path(conf or config_dir())
    for arg in argv:
        if arg.startswith(("-", "~")) or "=" not in arg:
            continue
        group, value = arg.lstrip("+").split("=", 1)
        options_dir = folder / group
        if "." in group or group.startswith("hydra") or not options_dir.is_dir() or value in ("null", ""):
            continue
        known = sorted(p.stem for p in options_dir.glob("*.yaml"))
        for option in value.split(","):
            if option not in known:
                close = closest_name(option, known)
                hint = f"did you mean {group}={close}? " if close else ""
                return f"Unknown {group} '{option}': {hint}(known: {', '.join(known)})."
    return None


def misspelt_nested_key(argv: list[str], conf: str | None = None) -> str | None:
    """A sentence for a dotted override naming a setting its group does not have
    (``graph.kinter=3``), with the closest valid one; ``None`` when all exist. The config is
    composed once without those overrides (Hydra's own answer would be "append with +graph.kinter",
    which adds a key nothing reads)."""
    from omegaconf import DictConfig

    plain = [a for a in argv if "=" in a and not a.startswith(("-", "hydra.", "hydra/"))]
    dotted = [a for a in plain if not a.startswith(("+", "~")) and "." in a.split("=", 1)[0]]
    if not dotted:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=conf or config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=[a for a in plain if a not in dotted])
    except Exception:  # noqa: BLE001 - another problem: Hydra reports it in its own words
        return None
    finally:
        GlobalHydra.instance().clear()
    for arg in dotted:
        key, value = arg.split("=", 1)
        parts, node = key.split("."), cfg
        for i, part in enumerate(parts):
            if not isinstance(node, DictConfig):
                break
            keys = sorted(str(k) for k in node.keys())  # (``in`` would miss a mandatory ``???`` value)
            if part in keys:
                try:
                    node = node[part]
                except Exception:  # noqa: BLE001 - a mandatory value not set yet: it exists
                    break
                continue
            close = closest_name(part, keys)
            parent = ".".join(parts[:i])
            hint = f"did you mean {'.'.join([*parts[:i], close, *parts[i + 1:]])}={value}? " if close else ""
            return f"'{key}' is not a setting: {parent} has no '{part}'; {hint}({parent} has: {', '.join(keys)})."
    return None


def main() -> None:
    """``python -m ldsc.run [overrides]``: check the command line and the output folder, then run
    (see :func:`run_main`); a sweep (``-m``) whose jobs were refused exits non-zero after the rest."""
    args = sys.argv[1:]
    problem = unwritable_output(args) or misspelt_override(args) or unknown_choice(args) or misspelt_nested_key(args)
    if problem:
        print(f"ldsc: error: {problem}", file=sys.stderr)
        sys.exit(1)
    hold_signals()  # until the run's handlers are installed: a Ctrl-C inside an import breaks it
    try:
        run_main()
        release_signals()  # a signal that came between two jobs of a sweep, or after the last
    except KeyboardInterrupt:  # Ctrl-C before the run's own handlers were installed (or after)
        print("ldsc: error: Stopped by SIGINT (Ctrl-C) before the run started; nothing was written.", file=sys.stderr)
        sys.exit(130)
    if _failed_jobs:
        done = len(_job_overrides) - len(_failed_jobs)
        common = set.intersection(*(set(o) for o in _job_overrides.values()))  # shown once: only what varies
        named = "; ".join(f"job {num}: {' '.join(o for o in _job_overrides[num] if o not in common) or 'the defaults'}"
                          for num in _failed_jobs)
        print(f"ldsc: error: {len(_failed_jobs)} of {len(_job_overrides)} jobs of the sweep were refused, each for the "
              f"reason printed above ({named}); {done} finished.", file=sys.stderr)
        sys.exit(1)
    exit_now(0)


def exit_now(code: int = 0) -> None:
    """End a finished run without the interpreter's teardown (freeing torch's and Lightning's
    objects one by one took 1.2–1.4 s after the last line): the exit handlers run, the logs and
    streams are flushed, then the process ends. Every output is already on disk (written atomically)."""
    import atexit

    atexit._run_exitfuncs()
    quiet_exit(code)


#: sweep bookkeeping (``-m``): the overrides of every job run, and the numbers of the refused ones
_job_overrides: dict[int, list[str]] = {}
_failed_jobs: list[int] = []


def quiet_exit(code: int) -> None:
    """End a process launched by rank 0 at once, after flushing its logs: a normal interpreter exit
    with the process group's threads still running can end in C++'s "terminate called without an
    active exception", printed after rank 0's sentence."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - a closed stream: nothing left to flush
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wait_for_launched_processes(timeout: float = 30.0) -> None:
    """Rank 0 of a run on several processes: wait (at most ``timeout`` s) for the processes it
    launched, which Lightning stops when the run fails, so that their last output precedes the
    error sentence (the last line a user or a script reads)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # none left
            return
        if pid == 0:
            time.sleep(0.05)


def report_error(err: LdscError, console: bool = True) -> None:
    """Print ``err`` once, as one sentence on stderr, and put it into the run's log file (not on the
    console a second time)."""
    root = logging.getLogger()
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (err,), None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    if console:
        print(f"ldsc: error: {err}", file=sys.stderr, flush=True)


def refuse_local_sweep_on_several_processes(cfg: DictConfig) -> None:
    """A local multirun (``-m`` with Hydra's basic launcher) cannot start DDP processes: Lightning
    starts them by running the command line again, which would start the whole sweep again."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    from ldsc.runtime.validate import runs_on_several_processes

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and runs_on_several_processes(cfg) and "BasicLauncher" in str(hc.launcher.get("_target_", "")):
        raise ConfigError("A local sweep (-m) cannot run on several processes (trainer.devices > 1): run each "
                          "setting as its own command, or sweep on a cluster with hydra/launcher=slurm.")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def run_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    sweep = hc is not None and hc.mode == RunMode.MULTIRUN
    if sweep:
        _job_overrides[int(hc.job.num)] = list(hc.overrides.task)
    log.info("ldsc %s: %s", "job %d of the sweep" % hc.job.num if sweep else "run",
             cfg.paths.output_dir)  # the first line, before the heavy imports
    try:
        refuse_local_sweep_on_several_processes(cfg)
        fit(cfg)
    except SystemExit as exc:  # Lightning's SIGTERMException when a signal beat the solver's own stop
        from ldsc import interrupt

        if interrupt.requested is None or exc.code not in (None, 0):
            raise
        print(f"ldsc: error: Stopped by {interrupt.requested}; the last checkpoint is in "
              f"{Path(cfg.paths.output_dir) / 'checkpoints'}: continue with the same command plus `resume=true "
              f"hydra.run.dir={cfg.paths.output_dir}`.", file=sys.stderr)
        sys.exit(128 + interrupt.signal_number(interrupt.requested))
    except Exception as exc:
        from ldsc import interrupt
        from ldsc.distributed import launch_rank

        err = user_error(exc)
        if err is None and launch_rank() != 0 and interrupt.requested and "closed by peer" in str(exc):
            quiet_exit(128 + interrupt.signal_number(interrupt.requested))  # the first process stopped on the signal
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":  # the whole traceback when asked for
            raise

        if launch_rank() != 0:  # a process launched by the first: the first says it (once), this one logs it
            report_error(err, console=False)
            quiet_exit(getattr(err, "exit_code", 1))
        from ldsc.runtime.validate import runs_on_several_processes

        if runs_on_several_processes(cfg):  # whatever they print on their way out comes before the sentence
            wait_for_launched_processes()
        report_error(err)
        remove_stub_folder(cfg.paths.output_dir)
        if sweep:  # the other jobs still run; the sweep exits non-zero at the end (see main)
            _failed_jobs.append(int(hc.job.num))
            return
        sys.exit(getattr(err, "exit_code", 1))


if __name__ == "__main__":
    main()
