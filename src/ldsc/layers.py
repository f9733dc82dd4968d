"""``python -m ldsc.layers backbone=... [backbone.model_id=...] [backbone.input_size=...]``: the
attention layers a backbone can capture, so that ``backbone.layers`` can be chosen.

One row per layer, in the order the network runs them: the name ``backbone.layers`` selects by
(index or glob pattern), the module it is read from, its token grid at the input size, heads,
head width, the tokens it compares besides the grid that are dropped (class token, registers,
distillation or text tokens), and whether the current ``backbone.layers`` (and, for Stable
Diffusion, ``max_grid``) captures it. The model is loaded as a run would load it (same config
group, same overrides); nothing is written.

Example::

    $ python -m ldsc.layers backbone=dinov2_reg backbone.layers=[-4,-1]
    backbone: facebook/dinov2-with-registers-base (Dinov2WithRegistersModel), input 518 px
      #  name      module                                   grid   heads  head dim  dropped  captured
      0  layer.0   encoder.layer.0.attention.attention      37x37     12        64        5
      ...
"""

from __future__ import annotations

import logging
import sys

from ldsc.errors import LdscError

log = logging.getLogger("ldsc")


def compose_backbone(overrides: list[str]):
    """The ``backbone`` node of the run config composed with ``overrides`` (and ``base_size``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ldsc.run import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise LdscError(str(err).splitlines()[0]) from err
    finally:
        GlobalHydra.instance().clear()
    return cfg


def layer_table(backbone) -> list[str]:
    """The lines printed for ``backbone`` (see the module docstring)."""
    rows = backbone.describe_layers()
    header = ["#", "name", "module", "grid", "heads", "head dim", "dropped", "captured"]
    cells = [[str(i), r["name"], r.get("module", r["name"]), r["grid"], str(r["heads"]), str(r["head_dim"]),
              str(r["dropped"]), "yes" if r["captured"] else ""] for i, r in enumerate(rows)]
    if all(c[2] == c[1] for c in cells):  # the module path adds nothing
        header.pop(2)
        cells = [c[:2] + c[3:] for c in cells]
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    numeric = {"#", "heads", "head dim", "dropped"}

    def line(values):
        return "  ".join(v.rjust(w) if h in numeric else v.ljust(w) for v, w, h in zip(values, widths, header)).rstrip()

    captured = sum(r["captured"] for r in rows)
    return [line(header), *(line(c) for c in cells), f"{captured} of {len(rows)} layers captured"]


def describe(overrides: list[str]) -> list[str]:
    from hydra.utils import instantiate

    from ldsc.run import base_grid

    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_backbone(overrides)
    from ldsc.run import user_error
    from ldsc.runtime.validate import MISSING_HINTS

    try:
        backbone = instantiate(cfg.backbone)
    except MissingMandatoryValue as err:
        key = str(err.full_key) if getattr(err, "full_key", None) else "a setting"
        raise LdscError(f"{key} is not set: pass {MISSING_HINTS.get(key, key + '=...')}.") from err
    except Exception as err:  # noqa: BLE001 - Hydra wraps what the backbone raised
        mine = user_error(err)
        if mine is None:
            raise
        raise mine from None
    backbone.set_base_size(base_grid(cfg, 2))
    source = cfg.backbone.get("model_id") or cfg.backbone.get("model_name") or type(backbone).__name__
    model = getattr(backbone, "model", None) or getattr(backbone, "unet", None)
    kind = f" ({type(model).__name__})" if model is not None else ""
    return [f"backbone: {source}{kind}, input {backbone.input_size} px", *layer_table(backbone)]


def main(argv: list[str] | None = None) -> int:
    from ldsc.run import misspelt_nested_key, misspelt_override, unknown_choice

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.split("\n\n")[0])
        return 0
    try:
        problem = misspelt_override(args) or unknown_choice(args) or misspelt_nested_key(args)
        if problem:
            raise LdscError(problem)
        lines = describe(args)
    except (LdscError, ValueError) as err:
        print(f"ldsc.layers: error: {err}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
