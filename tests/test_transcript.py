"""docs/first-minutes.md stays true: its commands are run and their key lines checked, and every
key line checked here must appear in the page (so the page changes when a message does)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import COCO_DIR, run_cli

PAGE = Path(__file__).resolve().parents[1] / "docs" / "first-minutes.md"

#: (command-line arguments of `python -m ldsc.run`, exit code, key lines as regular expressions)
DEMO = ([], 0, [r"\[ldsc\]\[INFO\] - ldsc run: \S+_pixel_qk$",
                r"\[ldsc\]\[INFO\] - 8 image\(s\), base grid 32x32, K=15$",
                r"feature store: writing 8 image\(s\) x 1 draw\(s\) to outputs/store/\w+$",
                r"\[ldsc.progress\]\[INFO\] - features: 8/8 img in [\d.]+ s$",
                r"graphs: pixel32 32x32, pixel16 16x16, pixel8 8x8$",
                r"LOBPCG solver: converged after \d+ iterations",
                r"solve: \d+/20 epochs in [\d.]+ s \[residual=",
                r"eigenvectors written to \S+/eigvecs.pt$",
                r"multilevel start: 8x8 grid \(1 layer graph\(s\)\), \d+ iteration\(s\)$",
                r"figures: drawn in the background by process \d+ into \S+/figures \(its lines follow in run.log\)$",
                r"\[ldsc\]\[INFO\] - outputs in \S+_pixel_qk$"])
MISTAKE = (["grpah=vv"], 1, [r"^ldsc: error: 'grpah' is neither a config group nor a setting: did you mean graph=vv\?"])
DATASET = ([f"data=folder", f"data.root={COCO_DIR}", "data.limit=24", "graph=vv"], 0,
           [r"\[ldsc\]\[INFO\] - 24 image\(s\), base grid 32x32, K=15$",
            r"feature store: writing 24 image\(s\) x 1 draw\(s\)",
            r"features: 24/24 img in [\d.]+ s$",
            r"solve: \d+/20 epochs in [\d.]+ s \[residual=",
            r"figures: drawn in the background by process \d+ into \S+/figures"])


def _check(args, code, patterns, cwd):
    res = run_cli(args, cwd=cwd, env_extra={"LDSC_PROGRESS": "lines"})
    assert res.returncode == code, res.stderr[-2000:]
    lines = (res.stdout + res.stderr).splitlines()
    for p in patterns:
        assert any(re.search(p, ln) for ln in lines), f"no line matches {p!r}:\n" + "\n".join(lines[-30:])
    if code:  # a refusal: one sentence, on stderr, once, and no folder
        assert len([ln for ln in lines if ln.startswith("ldsc: error:")]) == 1
        assert not (Path(cwd) / "outputs").exists()
    page = PAGE.read_text().splitlines()
    for p in patterns:
        assert any(re.search(p, ln) for ln in page), f"docs/first-minutes.md lacks a line matching {p!r}"


def test_the_demo_prints_what_the_page_shows(tmp_path):
    _check(*DEMO, cwd=tmp_path)


def test_the_mistake_prints_what_the_page_shows(tmp_path):
    _check(*MISTAKE, cwd=tmp_path)


def test_the_dataset_run_prints_what_the_page_shows(tmp_path):
    if not COCO_DIR.is_dir():
        pytest.skip(f"real test images {COCO_DIR} are absent (they live in ../shared/data, outside the repo)")
    _check(*DATASET, cwd=tmp_path)


def test_the_first_line_comes_before_the_heavy_imports(tmp_path):
    """The run's first line is printed before Lightning (seconds to import) is loaded: the
    interpreter's import log (``-X importtime``, on stderr) and the log (stdout) share one pipe."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "ldsc.run", "K=5000"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = res.stdout.splitlines()
    first = next(i for i, ln in enumerate(lines) if "ldsc run:" in ln)
    # (K=5000 is refused before Lightning is needed at all: then it is never imported)
    lightning = next((i for i, ln in enumerate(lines) if re.search(r"\|\s+lightning$", ln)), len(lines))
    assert first < lightning
    assert "K=5000 must be smaller" in res.stdout
