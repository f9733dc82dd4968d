"""End-to-end benchmark: the whole `python -m ldsc.run` against ncut-pytorch's whole process, and
both against the exact reference, one JSON line per (case, method).

    python -m ldsc.bench                                  # cases startup, coco, single, crops300, crops1k
    python -m ldsc.bench --cases coco --reference-cache outputs/bench/reference
    python -m ldsc.bench --ncut-python .venv-ncut/bin/python   # ncut-pytorch installed in another venv

Cases (``graph=vv``, K = 15, the pixel backbone, every other setting the default config's):

* ``startup``: ``python -c "import ldsc.run, lightning"`` and ``python -m ldsc.run --help`` (the
  imports and the config alone), and ncut-pytorch's ``import ncut_pytorch``.
* ``coco``: the 101 images of ``coco_val2017_first100`` (data-set mode, 32x32 base grid, pixel
  layers 32/16/8, 25 intra + 25 inter-image neighbours; 512-d vectors).
* ``single``: ``single_image.jpg`` (single-image mode, 64x64 base grid, layers 64/32/16).
* ``crops300``, ``crops1k``: the first 300 / 1,000 images of ``--crops`` (random crops of the COCO
  images: ``experiments/make_images.py``), 64-d vectors (``backbone.n_features=32``) for both
  methods: ~3·10⁵ / ~10⁶ tokens in the finest layer. ``crops300`` has the exact reference,
  ``crops1k`` none (its brute-force search would take hours here).

Methods, each a fresh subprocess timed from start to exit (imports included), run one after the
other in this benchmark so that both see the same machine load:

* ``ldsc``: ``python -m ldsc.run`` with a fresh feature store (figures drawn the default way: by a
  background process once ``eigvecs.pt`` is written; the benchmark waits for that process before
  the next measurement and reports ``figures_ready_after_s``); its ``stages.json`` gives the
  seconds of each stage, and ``outside_fit_s`` = whole process − ``fit`` (the fit stage runs from
  the first image read to the end of the export; outside it: the interpreter, the imports before
  the data work, the config, the exit).
* ``ncut-pytorch``: a process that loads the images (ldsc's own reader, no Lightning), computes
  the same pixel features of the finest layer and runs ``Ncut(n_eig=K).fit_transform`` (its own
  Nyström normalised cut on an RBF graph of those features; ``pip install ncut-pytorch``, or in a
  venv of its own given by ``--ncut-python``); it reports its own load / features / fit seconds.
* ``exact``: ``solver=exact graph.search=exact`` (brute-force neighbours, ``eigsh``): the
  reference both are aligned with (mean cos² of the principal angles; 1.0 = the same subspace).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def compose(overrides: list[str]):
    """The composed config (no Hydra run) of ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldsc.run import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``cmd``; returns (wall seconds, the finished process)."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc


def ncut_process(args) -> None:
    """The ncut-pytorch side (run as ``python -m ldsc.bench --ncut-process``): load, features, fit."""
    t0 = time.perf_counter()
    import torch
    from ncut_pytorch import Ncut

    from ldsc.features.backbones.pixel import PixelBackbone
    from ldsc.graphs.knn import head_vectors
    from ldsc.features.images import IMAGE_EXTENSIONS, image_tensor

    root = Path(args.root)
    files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    files = files[: args.limit] if args.limit else files
    backbone = PixelBackbone(n_features=args.n_features)
    backbone.set_base_size(args.base)
    t1 = time.perf_counter()
    images = torch.stack([image_tensor(f, backbone.input_size, getattr(backbone, "view", None)) for f in files])
    t2 = time.perf_counter()
    layer = backbone(images)[0]  # the finest layer: the base grid
    x = head_vectors(layer.vectors(args.role), "concat")[0]
    t3 = time.perf_counter()
    if args.affinity == "cosine":
        from ncut_pytorch.utils.math import cosine_affinity

        eig = Ncut(n_eig=args.K, affinity_fn=cosine_affinity).fit_transform(x)
    else:  # ncut-pytorch's default: rbf_affinity
        eig = Ncut(n_eig=args.K).fit_transform(x)
    t4 = time.perf_counter()
    torch.save({"eigvecs": eig.reshape(len(files), args.base, args.base, args.K).permute(0, 3, 1, 2).contiguous(),
                "files": [str(f) for f in files]}, args.out)
    print(json.dumps({"imports_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2), "features_s": round(t3 - t2, 2),
                      "fit_s": round(t4 - t3, 2), "tokens": int(x.shape[0]), "dim": int(x.shape[1])}))


def align(run: Path, ref: Path) -> float:
    import torch

    from ldsc.spectral import subspace_alignment

    Z = torch.load(run, weights_only=True)["eigvecs"]
    R = torch.load(ref, weights_only=True)["eigvecs"]
    return round(subspace_alignment(Z, R), 5)


#: (data overrides, base grid, n_features, images, exact reference affordable) of each image case
def _case(name: str, args) -> tuple[list[str], int, int | None, int | None, bool]:
    if name == "coco":
        return ["data=folder", f"data.root={args.coco}"], 32, None, None, True
    if name == "single":
        return ["data=single", f"data.path={args.image}"], 64, None, None, True
    if name in ("crops300", "crops1k"):
        n = 300 if name == "crops300" else 1000
        return ["data=folder", f"data.root={args.crops}", f"data.limit={n}"], 32, 32, n, name == "crops300"
    raise SystemExit(f"unknown case {name!r}: choose from startup, coco, single, crops300, crops1k")


def wait_for_figures(run_log: Path, timeout: float = 600.0) -> float | None:
    """Wait until the figures' background process named in ``run_log`` (if any) has exited;
    returns the seconds waited (``None``: the run drew no figures in the background)."""
    import os
    import re

    text = run_log.read_text(errors="replace") if run_log.is_file() else ""
    found = re.search(r"drawn in the background by process (\d+)", text)
    if not found:
        return None
    pid, t = int(found.group(1)), time.perf_counter()
    while time.perf_counter() - t < timeout:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return round(time.perf_counter() - t, 2)


def startup(py: str, ncut_py: str, repeats: int = 3) -> None:
    """Seconds of the imports alone (best of ``repeats``): what every run pays before its work."""
    def best(cmd):
        return min(timed(cmd)[0] for _ in range(repeats))

    rows = {"ldsc: import ldsc.run, lightning": best([py, "-c", "import ldsc.run, lightning"]),
            "ldsc: python -m ldsc.run --help": best([py, "-m", "ldsc.run", "--help"]),
            "python -c pass": best([py, "-c", "pass"])}
    try:
        rows["ncut-pytorch: import ncut_pytorch"] = best([ncut_py, "-c", "import ncut_pytorch"])
    except SystemExit as err:
        rows["ncut-pytorch"] = f"skipped: {str(err)[:200]}"
    print(json.dumps({"case": "startup", "seconds": {k: (round(v, 2) if isinstance(v, float) else v)
                                                     for k, v in rows.items()}}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="startup,coco,single,crops300,crops1k")
    p.add_argument("--coco", default=str(SHARED / "coco_val2017_first100"))
    p.add_argument("--image", default=str(SHARED / "single_image.jpg"))
    p.add_argument("--crops", default="data/crops10k", help="folder of random crops (experiments/make_images.py)")
    p.add_argument("--reference-cache", default=None, help="keep each case's exact reference here (reused)")
    p.add_argument("--ncut-python", default=sys.executable, help="the Python that has ncut_pytorch (and ldsc)")
    p.add_argument("--ncut-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--K", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3, help="startup: the best of this many runs of each command")
    p.add_argument("--n-features", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--role", default="v", choices=["v", "q", "k"], help=argparse.SUPPRESS)
    p.add_argument("--affinity", default="rbf", choices=["rbf", "cosine"], help=argparse.SUPPRESS)
    p.add_argument("--override", action="append", default=[],
                   help="an extra Hydra override for the ldsc run (not the reference), repeatable")
    p.add_argument("--methods", default="ldsc,ncut-pytorch", help="which of ldsc, ncut-pytorch to run")
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ncut_process:
        return ncut_process(args)

    py = sys.executable
    for case in args.cases.split(","):
        if case == "startup":
            startup(py, args.ncut_python, args.repeats)
            continue
        data, base, n_features, limit, with_reference = _case(case, args)
        features = [f"backbone.n_features={n_features}"] if n_features else []
        over = [*data, "graph=vv", f"K={args.K}", *features]
        src = data[1].split("=", 1)[1]
        # (ignore_cleanup_errors: the figures a background process may still be writing into the run folder)
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            tmp = Path(tmp)
            cache = Path(args.reference_cache) / case if args.reference_cache else tmp / "exact"
            if with_reference and not (cache / "eigvecs.pt").is_file():
                wall, _ = timed([py, "-m", "ldsc.run", *over, "solver=exact", "graph.search=exact", "solver.max_tokens=1000000",
                                    "callbacks.export.figures=false", "callbacks.alignment.enabled=false",
                                    f"store.dir={tmp / 'store_exact'}", f"hydra.run.dir={cache}"])
                stages = json.loads((cache / "stages.json").read_text())
                print(json.dumps({"case": case, "method": "exact", "wall_s": round(wall, 2), "stages": stages}),
                      flush=True)
            ref = cache / "eigvecs.pt" if with_reference else None
            methods = args.methods.split(",")
            if "ldsc" in methods:
                wall, _ = timed([py, "-m", "ldsc.run", *over, *args.override, f"store.dir={tmp / 'store'}",
                                 f"hydra.run.dir={tmp / 'ldsc'}"])
                stages = json.loads((tmp / "ldsc" / "stages.json").read_text())
                # the figures' process must not run beside the next measurement: wait for it
                figures_s = wait_for_figures(tmp / "ldsc" / "run.log")
                print(json.dumps({"case": case, "method": "ldsc", "overrides": args.override,
                                  "wall_s": round(wall, 2),
                                  "figures_ready_after_s": figures_s,
                                  "outside_fit_s": round(wall - stages["fit"]["seconds"], 2),
                                  "alignment": align(tmp / "ldsc" / "eigvecs.pt", ref) if ref else None,
                                  "stages": stages}), flush=True)
            if "ncut-pytorch" not in methods:
                continue
            try:
                cmd = [args.ncut_python, "-m", "ldsc.bench", "--ncut-process", f"--root={src}", f"--base={base}",
                       f"--K={args.K}", f"--out={tmp / 'ncut.pt'}", f"--n-features={n_features or 256}"]
                wall, proc = timed([*cmd, *([f"--limit={limit}"] if limit else [])])
                own = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps({"case": case, "method": "ncut-pytorch", "wall_s": round(wall, 2), **own,
                                  "alignment": align(tmp / "ncut.pt", ref) if ref else None,
                                  "note": "its own Nystrom RBF graph of the finest layer's features"}), flush=True)
            except SystemExit as err:
                print(json.dumps({"case": case, "method": "ncut-pytorch", "skipped": str(err)[:300]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
