"""Embed new images into a finished run's eigenvectors (docs/library.md, "From the command line").

    python -m ldsc.extend RUN_DIR [data=folder] data.root=NEW_DIR [data.batch_size=16] [out=DIR] [overwrite=true]

Reads ``RUN_DIR/fit.safetensors`` (written by runs of the default solver) and the run's feature
store, composes the run's configuration with the new data settings, streams the new images
through the run's backbone in batches and embeds each batch by out-of-sample extension
(:meth:`ldsc.LDSC.transform`): the run's eigenvectors do not move. Writes ``eigvecs.pt``,
``files.json`` and the figures to ``RUN_DIR/extend`` (or ``out``), in the format of a run.

Settings that change the vectors or the graphs (``backbone.*``, ``graph.*``, ``base_size``, ``K``,
``seed``, ``store.*``) are refused in one sentence: the new images must be read like the run's.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ldsc.errors import ConfigError, DataError, LdscError

log = logging.getLogger("ldsc.extend")

#: the parts of a run's configuration that the new images must share with it
FIXED = ("backbone", "graph", "base_size", "K", "seed", "store")
USAGE = "usage: python -m ldsc.extend RUN_DIR [data=folder] data.root=NEW_DIR [key=value ...] [out=DIR] [overwrite=true]"


def parse_args(argv: list[str]) -> tuple[Path, list[str], Path | None, bool]:
    """``(run_dir, overrides, out, overwrite)`` of the command line."""
    if not argv:
        raise ConfigError(f"no run folder given. {USAGE}")
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    run_dir, rest = Path(argv[0]), argv[1:]
    out, overwrite, overrides = None, False, []
    for arg in rest:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"'{arg}' is not a key=value setting. {USAGE}")
        if key == "out":
            out = Path(value)
        elif key == "overwrite":
            overwrite = value.lower() in ("1", "true", "yes")
        else:
            top = key.lstrip("+~").split(".")[0]
            if top in FIXED:
                raise ConfigError(f"'{arg}' would read the new images unlike the run's (its {top} settings are fixed): "
                                  f"extend with the run's settings, or start a new run.")
            overrides.append(arg)
    return run_dir, overrides, out, overwrite


def merged_overrides(recorded: list[str], new: list[str]) -> list[str]:
    """The run's command-line overrides with the new ones on top: a new ``key=...`` replaces the
    run's for that key, and a new group choice (``data=folder``) drops the run's settings of it."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in new}
    groups = {k for k in keys if "." not in k}
    kept = [o for o in recorded
            if o.split("=", 1)[0].lstrip("+~") not in keys
            and o.split("=", 1)[0].lstrip("+~").split(".")[0] not in groups
            and not o.startswith(("hydra.", "paths.output_dir", "resume", "ckpt_path", "overwrite"))]
    return kept + new


def compose_config(run_dir: Path, overrides: list[str], out: Path):
    """The run's configuration with ``overrides``; refused when its fixed parts differ from the
    run's recorded ones."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ldsc.run import config_dir, misspelt_nested_key, misspelt_override

    problem = misspelt_override(overrides) or misspelt_nested_key(overrides)
    if problem:
        raise ConfigError(problem)
    recorded_path = run_dir / ".hydra" / "config.yaml"
    if not recorded_path.is_file():
        raise DataError(f"'{run_dir}' has no .hydra/config.yaml: is it the output folder of `python -m ldsc.run`?")
    recorded = OmegaConf.load(recorded_path)
    over_path = run_dir / ".hydra" / "overrides.yaml"
    run_overrides = list(OmegaConf.load(over_path)) if over_path.is_file() else []
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config",
                          overrides=merged_overrides(run_overrides, overrides) + [f"paths.output_dir={out}"])
    except Exception as err:  # Hydra's errors for unknown groups, keys or values
        raise ConfigError(f"the settings {overrides} do not compose with the run's configuration: "
                          f"{str(err).splitlines()[0]}") from None
    before, now = OmegaConf.to_container(recorded, resolve=False), OmegaConf.to_container(cfg, resolve=False)
    for key in FIXED:
        a, b = before.get(key), now.get(key)
        if key != "store" and a != b:  # (where stores live may differ: the model names its own store)
            raise ConfigError(f"the run's {key} settings ({a}) differ from the ones composed now ({b}) — the "
                              f"configuration files changed since the run: extend with the version that made it.")
    return cfg


def extend(run_dir: str | Path, overrides: list[str] | None = None, out: str | Path | None = None,
           overwrite: bool = False) -> Path:
    """Embed the images named by ``overrides`` (the ``data`` settings) into the run at ``run_dir``;
    returns the output folder (see module docstring)."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from ldsc.estimator import LDSC
    from ldsc.export import save_eigenvectors, write_figures
    from ldsc.features.backbones.base import backbone_draws
    from ldsc.features.images import ImageFiles
    from ldsc.progress import bar

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"'{run_dir}' is not a folder: give the output folder of a finished `python -m ldsc.run`.")
    model_path = run_dir / "fit.safetensors"
    if not model_path.is_file():
        raise DataError(f"'{run_dir}' has no fit.safetensors: only finished runs of the default solver "
                        f"(solver=lobpcg) on kNN graphs can be extended.")
    out = Path(out) if out else run_dir / "extend"
    if (out / "eigvecs.pt").exists() and not overwrite:
        raise ConfigError(f"'{out}' already holds an extension's eigvecs.pt: add overwrite=true to replace it, "
                          f"or out=DIR to write elsewhere.")
    cfg = compose_config(run_dir, list(overrides or []), out)
    datamodule = instantiate(cfg.data)
    files = datamodule.prepare_files()
    model = LDSC.load(model_path, progress=False)
    backbone = instantiate(cfg.backbone)
    backbone.set_base_size(model.base_size_)
    backbone.freeze()
    draws = int(getattr(backbone, "draws", 1))
    log.info("%d new image(s) into %s (K=%d, base grid %dx%d, %d graphs)", len(files), run_dir, model.K,
             model.base_size_, model.base_size_, len(model.graphs_))
    n = len(files)
    Z = torch.empty(n, model.K, model.base_size_, model.base_size_)
    loader = DataLoader(ImageFiles(files, backbone.input_size, getattr(backbone, "view", None)), batch_size=int(cfg.data.batch_size),
                        num_workers=int(cfg.data.get("num_workers", 0)))
    seed = int(cfg.seed)
    with bar(total=n, desc="extend", unit="img") as pbar:
        for batch in loader:
            images, index = batch["image"], batch["index"]
            per_draw = [feats for _, feats in backbone_draws(backbone, images, index, seed, draws)]
            model.check_layers(per_draw[0])
            Z[int(index[0]):int(index[-1]) + 1] = model.transform_features(per_draw)
            pbar.update(len(index))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["extends"] = str(run_dir)
    save_eigenvectors(out, Z, files, resolved, keep_order=True, keep_signs=True)
    log.info("eigenvectors written to %s", out / "eigvecs.pt")
    write_figures(out, Z, files, view=getattr(backbone, "view", None))
    log.info("figures written to %s", out / "figures")
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        run_dir, overrides, out, overwrite = parse_args(list(sys.argv[1:] if argv is None else argv))
        extend(run_dir, overrides, out, overwrite)
    except LdscError as err:
        print(f"ldsc.extend: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ldsc.extend: error: Stopped by SIGINT (Ctrl-C); nothing was written.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
