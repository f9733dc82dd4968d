"""Writing a finished run: ``eigvecs.pt``, the image index and the figures.

The figures can be drawn by a separate process once ``eigvecs.pt`` is written
(:func:`draw_figures_in_background`, ``callbacks.export.figures=background``), so the run returns
its answer without waiting for matplotlib; ``python -m ldsc.export RUN_DIR`` draws them (again)
from a finished run.

``eigvecs.pt`` holds ``eigvecs`` ``(n_images, K, H, W)`` (channel 0 first: SVD-ordered for the
paper's solver, whose pseudo-eigenvectors are not orthogonal; in order of decreasing eigenvalue
for the LOBPCG and exact solvers, whose output is), ``singular_values`` ``(K,)``, ``files`` (index -> image path), ``K``,
``base_size`` and the resolved ``config``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldsc.evaluation import figures as viz
from ldsc.atomic import atomic_torch_save, atomic_write_text
from ldsc.features.images import load_image
from ldsc.spectral import svd_order


def save_eigenvectors(out_dir: str | Path, Z: torch.Tensor, files: list[str], config: dict | None = None,
                      keep_order: bool = False, keep_signs: bool = False) -> torch.Tensor:
    """SVD-order ``Z`` (``(n, K, H, W)``; ``keep_order``: it is orthonormal and eigenvalue-ordered
    already, see :func:`~ldsc.spectral.alignment.svd_order`), write ``eigvecs.pt`` and ``files.json``;
    returns the ordered eigenvectors. ``keep_signs``: write ``Z`` exactly as given (new images
    embedded into a run: their signs are the run's)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if keep_signs:
        E = Z.float()
        sq = torch.zeros(E.shape[1], dtype=torch.float64)
        for i in range(0, E.shape[0], 256):  # per block of images: no copy of the whole table
            sq += E[i:i + 256].double().pow(2).sum((0, 2, 3))
        s = sq.sqrt().float()
    else:
        E, s = svd_order(Z, keep_order=keep_order)
    payload = {"eigvecs": E, "singular_values": s, "files": list(files), "K": E.shape[1],
               "base_size": E.shape[-1], "config": config or {}}
    atomic_torch_save(payload, out / "eigvecs.pt")
    atomic_write_text(out / "files.json", json.dumps(list(files), indent=0))
    return E


def load_eigenvectors(run_dir: str | Path) -> dict:
    """Read a run's ``eigvecs.pt`` (see module docstring) with ``weights_only=True``: tensors and
    plain containers only, so a file received from someone else cannot run code when loaded."""
    import pickle

    from ldsc.errors import DataError

    path = Path(run_dir) / "eigvecs.pt"
    if not path.is_file():
        raise DataError(f"'{path}' does not exist: is '{run_dir}' the output folder of a finished `python -m ldsc.run`?")
    try:
        run = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(f"'{path}' holds objects other than tensors and plain containers, so it was not loaded "
                        f"(loading it could run code): {str(e).splitlines()[0][:200]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DataError(f"'{path}' is not a readable eigvecs.pt (truncated or corrupt: {str(e).splitlines()[0][:200]}); "
                        f"re-run the export or ask for the file again.") from None
    if not isinstance(run, dict) or "eigvecs" not in run:
        raise DataError(f"'{path}' is not an ldsc eigvecs.pt (no 'eigvecs' entry).")
    return run


def write_figures(out_dir: str | Path, eigvecs: torch.Tensor, files: list[str], max_images: int | None = 16,
                  n_vectors: int = 12, grid_vectors: int = 15, grid_images: int = 8, view=None) -> list[Path]:
    """Per-image panels (input, first ``n_vectors`` eigenvectors, PCA-to-RGB) for the first
    ``max_images`` images (``None``: every image) and, for several images, the
    leading-``grid_vectors`` grid of the first ``grid_images`` images. ``view``: the part of each
    image the backbone saw (:class:`~ldsc.features.images.ImageView`; default: the whole image)."""
    from ldsc.features.images import ImageView
    from ldsc.progress import bar

    view = view or ImageView()

    fig_dir = Path(out_dir) / "figures"
    paths = []
    n = len(files)
    shown = n if max_images is None else min(int(max_images), n)
    for i in bar(range(shown), desc="figures", unit="fig", disable=shown < 8):
        img = view.visible(load_image(files[i]))
        fig = viz.eigenvector_panel(img, eigvecs[i], n_vectors=n_vectors, title=Path(files[i]).name)
        paths.append(viz.save(fig, fig_dir / f"eigenvectors_{i:04d}_{Path(files[i]).stem}.png"))
    if n > 1:
        m = min(grid_images, n)
        imgs = [_thumbnail(view.visible(load_image(f)), 4 * eigvecs.shape[-1]) for f in files[:m]]
        fig = viz.eigenvector_grid(imgs, eigvecs, n_vectors=grid_vectors, max_images=m,
                                   names=[Path(f).name for f in files[:m]])
        paths.append(viz.save(fig, fig_dir / "eigenvector_grid.png"))
    return paths


def background_allowed(use_wandb: bool = False) -> str | None:
    """Why the figures must be drawn before the run returns, or ``None`` if a background process
    may draw them: a W&B logger uploads them from the run, and a SLURM job's processes end with
    the job (a process left drawing would be killed half-way)."""
    import os

    if use_wandb:
        return "the W&B logger uploads them"
    if os.environ.get("SLURM_JOB_ID"):
        return "a SLURM job ends its processes with it"
    return None


def draw_figures_in_background(out_dir: str | Path, max_images: int | None = 16, n_vectors: int = 12,
                               grid_vectors: int = 15, grid_images: int = 8):
    """Start ``python -m ldsc.export out_dir ...`` in its own session (a Ctrl-C or the end of the
    run does not stop it); it reads ``eigvecs.pt``, writes ``figures/`` (each file atomically) and
    appends its log lines to the run's ``run.log``. Returns the ``subprocess.Popen``."""
    import subprocess
    import sys

    out = Path(out_dir)
    log_path = out / "run.log" if (out / "run.log").is_file() else out / "figures.log"
    cmd = [sys.executable, "-m", "ldsc.export", str(out), f"--n-vectors={n_vectors}",
           f"--grid-vectors={grid_vectors}", f"--grid-images={grid_images}",
           f"--max-images={'all' if max_images is None else int(max_images)}"]
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                start_new_session=True, close_fds=True)


def main(argv=None) -> int:
    """``python -m ldsc.export RUN_DIR``: draw a finished run's figures from its ``eigvecs.pt``."""
    import argparse
    import logging
    import sys

    from ldsc.errors import LdscError

    p = argparse.ArgumentParser(prog="python -m ldsc.export", description=main.__doc__.split(": ", 1)[1])
    p.add_argument("run_dir")
    p.add_argument("--max-images", default="16", help="per-image figures for the first N images ('all': every image)")
    p.add_argument("--n-vectors", type=int, default=12)
    p.add_argument("--grid-vectors", type=int, default=15)
    p.add_argument("--grid-images", type=int, default=8)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        stream=sys.stderr)
    log = logging.getLogger("ldsc.export")
    try:
        max_images = None if args.max_images == "all" else int(args.max_images)
        run = load_eigenvectors(args.run_dir)
        from ldsc.features.images import ImageView

        view = ImageView.of((run.get("config") or {}).get("backbone"))
        paths = write_figures(args.run_dir, run["eigvecs"], run["files"], max_images=max_images,
                              n_vectors=args.n_vectors, grid_vectors=args.grid_vectors, grid_images=args.grid_images,
                              view=view)
    except (LdscError, OSError, ValueError) as err:
        log.error("figures not drawn: %s", err)
        return 1
    log.info("figures written to %s (%d files)", Path(args.run_dir) / "figures", len(paths))
    return 0


def _thumbnail(img, side: int):
    """``img`` scaled so that its longer side is ``side`` pixels (its shape kept)."""
    w, h = img.size
    scale = side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))))


if __name__ == "__main__":
    raise SystemExit(main())
