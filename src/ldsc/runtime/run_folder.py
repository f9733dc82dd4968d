"""The run's output folder: never written over by accident, never left behind by a refused run.

Hydra creates a run's folder (``outputs/runs/<date>/<time>_<backbone>_<graph>/``) before the run
starts; a run refused at its first check would leave it behind holding only Hydra's own files.
:class:`OutputFolderWatch`, a Hydra callback (``conf/hydra/default.yaml``), notes which folders of
that path are new, and :func:`remove_stub_folder` removes them again after a refusal.
:func:`refuse_overwrite` keeps a second run out of a folder that holds an earlier run's outputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ldsc.errors import ConfigError

#: what a run leaves in its folder that a later run would replace
RUN_OUTPUTS = ("eigvecs.pt", "checkpoints/last.ckpt")
#: what Hydra and the lock put into a run folder before the run does anything
STUB_ENTRIES = {".hydra", ".ldsc.lock"}
#: folders (the run folder and parents) that did not exist before Hydra created them for this run
_new_folders: list[Path] = []
#: an existing run folder's ``.hydra/*.yaml`` before Hydra replaced them with this run's
_earlier_hydra: dict[Path, bytes] = {}


class OutputFolderWatch:
    """A Hydra callback (``conf/hydra/default.yaml``) that notes, before Hydra creates the run's
    folder, which folders of its path are new, so that a refused run can remove them again
    (:func:`remove_stub_folder`) instead of leaving an empty ``outputs/runs/<time>_.../``."""

    def _note(self, config, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        _new_folders.clear()
        _earlier_hydra.clear()
        HydraConfig.instance().set_config(config)  # (Hydra sets it itself just after; the folder's name needs it)
        p = Path(str(OmegaConf.select(config, key))).absolute()
        if key == "hydra.run.dir" and (p / ".hydra").is_dir():  # an earlier run's record: kept if this one is refused
            _earlier_hydra.update({f: f.read_bytes() for f in (p / ".hydra").glob("*.yaml") if f.is_file()})
        while not p.exists() and p != p.parent:
            _new_folders.append(p)
            p = p.parent

    def on_run_start(self, config, **kwargs) -> None:
        self._note(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._note(config, "hydra.sweep.dir")

    # the other hooks Hydra calls on every callback
    def on_run_end(self, *args, **kwargs) -> None: ...
    def on_multirun_end(self, *args, **kwargs) -> None: ...
    def on_job_start(self, *args, **kwargs) -> None: ...
    def on_job_end(self, *args, **kwargs) -> None: ...
    def on_compose_config(self, *args, **kwargs) -> None: ...


def remove_stub_folder(folder: str | Path) -> None:
    """Remove a refused run's folder when this run created it and it holds nothing but a stub
    (:func:`_stub_entry`: ``.hydra/``, the log file, ``csv/hparams.yaml``), then its parents that this run created and left empty; in
    an earlier run's folder, put back that run's ``.hydra/`` record that Hydra replaced."""
    folder = Path(folder).absolute()
    for f, data in _earlier_hydra.items():
        try:
            f.write_bytes(data)
        except OSError:
            pass
    new = set(_new_folders)
    if not folder.is_dir() or not (folder in new or folder.parent in new):
        return
    if not all(_stub_entry(p) for p in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in sorted((p for p in new if p != folder), key=lambda p: len(p.parts), reverse=True):
        try:
            parent.rmdir()  # only when empty (another job of a sweep may have written there)
        except OSError:
            pass


def _stub_entry(p: Path) -> bool:
    """Whether ``p`` is something a run writes before any result: Hydra's record and log, the
    lock, a logger folder holding only the hyper-parameters (``csv/hparams.yaml``)."""
    if p.name in STUB_ENTRIES or p.name.endswith(".log"):
        return True
    return p.is_dir() and p.name == "csv" and all(f.name == "hparams.yaml" for f in p.rglob("*") if f.is_file())


def refuse_overwrite(folder: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to write over an earlier run's outputs (``eigvecs.pt`` or a checkpoint) in ``folder``
    unless the run continues it (``resume``) or says so (``overwrite``)."""
    if resume or overwrite:
        return
    out = Path(folder)
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if found:
        raise ConfigError(f"The output folder '{out}' holds an earlier run ({found[0]}): continue it with resume=true, "
                          f"replace it with overwrite=true, or choose another hydra.run.dir.")
