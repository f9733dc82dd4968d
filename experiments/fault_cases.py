"""Re-run the bad inputs and faults a new user meets, and count how each one ends.

    python experiments/fault_cases.py [--only NAME,...] [--out notes/measurements/fault_cases.jsonl]

Every case is a real process (``python -m ldsc.run`` / ``python -m ldsc.evaluate``) in a scratch
folder with two scikit-image photographs (nothing downloaded). Each ends in one of:

* ``ok``: a case that should work did, and its outputs check out;
* ``clean``: a case that should be refused was: non-zero exit, no traceback, and the last line of
  stderr is one ``ldsc: error: ...`` sentence (Hydra's own message for an unknown key or choice);
* ``traceback``: it ended in a Python traceback;
* ``unclear``: refused, but the error sentence was printed more than once (stdout and stderr
  together) or is not the last line;
* ``silent``: it exited 0 where it should have refused, or its outputs are wrong or were lost;
* ``hung``: it ran past its time limit.

One JSON line per case (name, expectation, outcome, exit code, last stderr line), then the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.batch_size=2", "base_size=16", "K=4", "trainer.max_epochs=2", "logger=none",
        "trainer.enable_progress_bar=false", "~callbacks.progress", "callbacks.export.figures=false"]
#: a run on two CPU processes (gloo)
DDP = ["trainer=ddp_cpu", "trainer.devices=2"]
ENV = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")


def run(args: list[str], module: str = "ldsc.run", timeout: float = 300, env: dict | None = None,
        file_limit: int | None = None) -> dict:
    """Run ``python -m module args``; returns exit code, stderr, seconds (``rc=None`` on timeout).
    ``file_limit``: the largest file the process may write, in bytes (``RLIMIT_FSIZE``: a write past
    it fails with EFBIG, as a full disk fails with ENOSPC)."""
    t = time.perf_counter()

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    try:
        p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                           env=env or ENV, preexec_fn=limit if file_limit else None)
        return {"rc": p.returncode, "stderr": p.stderr, "stdout": p.stdout, "s": time.perf_counter() - t}
    except subprocess.TimeoutExpired as e:
        return {"rc": None, "stderr": (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""),
                "stdout": "", "s": time.perf_counter() - t}


def merge(base: list[str], over: list[str]) -> list[str]:
    """``base`` overrides with those of ``over`` replacing any of the same key (Hydra refuses a key twice)."""
    key = lambda a: a.split("=", 1)[0].lstrip("~+")  # noqa: E731
    keys = {key(o) for o in over}
    return [a for a in base if key(a) not in keys] + list(over)


def classify(res: dict, expect: str, check=None) -> str:
    """The outcome of a finished case (see the module docstring)."""
    if res["rc"] is None:
        return "hung"
    if "Traceback (most recent call last)" in res["stderr"]:
        return "traceback"
    if expect == "ok":
        if res["rc"] != 0:
            return "refused"
        return "ok" if check is None or check() else "silent"
    if res["rc"] == 0:
        return "silent"
    lines = [ln for ln in res["stderr"].strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    hydra_msg = any(s in res["stderr"] for s in ("Could not override", "Could not find", "Could not load", "Error merging override",
                                                  "Could not append", "mismatched input", "no viable alternative"))
    if last.startswith(("ldsc: error:", "ldsc.evaluate: error:", "ldsc.extend: error:")):
        sentence = last.split("error:", 1)[1].strip()
        return "clean" if (res["stderr"] + res.get("stdout", "")).count(sentence) == 1 else "unclear"
    return "clean" if hydra_msg else "unclear"



class Workspace:
    """A scratch folder: images, a finished run with label maps, helpers to damage things."""

    def __init__(self, root: Path):
        from PIL import Image
        from skimage import data as skdata

        self.root = root
        self.images = root / "images"
        self.images.mkdir()
        Image.fromarray(skdata.astronaut()).save(self.images / "astronaut.png")
        Image.fromarray(skdata.coffee()).save(self.images / "coffee.png")
        self.n = 0

    def out(self, name: str) -> Path:
        self.n += 1
        return self.root / f"{self.n:02d}_{name}"

    def folder_args(self, out: Path) -> list[str]:
        return ["data=folder", f"data.root={self.images}", *FAST, f"hydra.run.dir={out}",
                f"paths.log_dir={self.root / 'logs'}", f"store.dir={self.root / 'store'}"]

    def finished_run(self) -> Path:
        """A finished run on the images plus one label map per image (for the evaluate cases)."""
        import numpy as np
        from PIL import Image

        out = self.root / "base_run"
        if not (out / "eigvecs.pt").exists():
            res = run(self.folder_args(out))
            assert res["rc"] == 0, res["stderr"][-2000:]
            labels = self.root / "labels"
            labels.mkdir()
            for f in self.images.iterdir():
                w, h = Image.open(f).size
                lab = np.zeros((h, w), dtype=np.uint8)
                lab[:, w // 2:] = 1
                Image.fromarray(lab).save(labels / f.name)
        return out

    def copy_run(self, name: str) -> tuple[Path, Path]:
        """A copy of the finished run and of its labels (to damage)."""
        base = self.finished_run()
        out = self.out(name)
        shutil.copytree(base, out / "run")
        shutil.copytree(self.root / "labels", out / "labels")
        return out / "run", out / "labels"


def config_cases(ws: Workspace):
    """Bad settings of ``python -m ldsc.run``: each must be refused in one sentence."""
    bad = {
        "K=abc": ["K=abc"], "K=2.5": ["K=2.5"], "K=0": ["K=0"], "K=-3": ["K=-3"],
        "K larger than the pixels": ["K=300"], "seed=abc": ["seed=abc"], "seed=-1": ["seed=-1"],
        "base_size=7 (layers empty)": ["base_size=7"], "base_size=0": ["base_size=0"],
        "trainer.max_epochs=0": ["trainer.max_epochs=0"], "trainer.max_epochs=-1": ["trainer.max_epochs=-1"],
        "data.batch_size=0": ["data.batch_size=0"], "data.limit=0": ["data.limit=0"],
        "data.num_workers=-1": ["data.num_workers=-1"], "graph.threshold=2": ["graph.threshold=2"],
        "graph.k_intra=-1": ["graph.k_intra=-1"], "graph.k_inter=-5": ["graph.k_inter=-5"],
        "no neighbours at all": ["graph.k_intra=0", "graph.k_inter=0"], "graph.heads=bogus": ["graph.heads=bogus"],
        "graph.search=bogus": ["graph.search=bogus"], "graph.list_size=0": ["graph.list_size=0"],
        "graph.nprobe=0": ["graph.nprobe=0"], "graph.dim=-3": ["graph.dim=-3"],
        "graph.reduce=bogus": ["graph.reduce=bogus", "graph.dim=8"], "solver.tol=-1": ["solver.tol=-1"],
        "solver.iters_per_step=0": ["solver.iters_per_step=0"], "solver.oversample=-1": ["solver.oversample=-1"],
        "backbone=nonexistent": ["backbone=nonexistent"], "graph=nonexistent": ["graph=nonexistent"],
        "solver=nonexistent": ["solver=nonexistent"], "unknown key": ["foo=bar"],
        "backbone.draws=0": ["backbone.draws=0"], "backbone.n_features=0": ["backbone.n_features=0"],
        "backbone.crop larger than backbone.resize": ["backbone.resize=128", "backbone.crop=256"],
        "backbone.resize=0": ["backbone.resize=0"],
        "backbone=fec without a checkpoint": ["backbone=fec"],
        "backbone=fec checkpoint missing": ["backbone=fec", f"backbone.checkpoint={ws.root / 'no_such.pth.tar'}"],
        "backbone=fec variant=huge": ["backbone=fec", "backbone.variant=huge", "backbone.pretrained=false"],
        "graph=assign with the pixel backbone": ["graph=assign"], "backbone.heads=bogus": ["backbone=clip", "backbone.heads=bogus"],
        "data.memory_limit_gb too small": ["data.memory_limit_gb=0.001"],
        "CLIP weights missing": ["backbone=clip", f"backbone.model_id={ws.root / 'no_such_model'}"],
        "CLIP weights folder empty": ["backbone=clip", f"backbone.model_id={ws.root / 'empty_model'}"],
        "backbone=hf without backbone.model_id": ["backbone=hf"],
        "backbone=dinov3 (no such preset)": ["backbone=dinov3"],
        "backbone=timm with an unknown model name": ["backbone=timm", "backbone.model_name=vit_no_such_model"],
        "backbone=timm weights not in the cache": ["backbone=timm", "backbone.model_name=vit_small_patch16_224.augreg_in21k"],
        "backbone=timm checkpoint file missing": ["backbone=timm", f"backbone.checkpoint={ws.root / 'no_such.pth'}"],
        "backbone=dit on a folder without transformer/": ["backbone=dit", f"backbone.model_id={ws.root / 'empty_model'}"],
        "backbone=sdxl weights missing": ["backbone=sdxl", f"backbone.model_id={ws.root / 'no_such_model'}"],
        "trainer.accelerator=gpu without a GPU": ["trainer.accelerator=gpu"],
        "solver=exact on 2 processes": [*DDP, "solver=exact"], "solver=paper on 2 processes": [*DDP, "solver=paper"],
        "trainer.devices=2 without the sharded strategy": ["trainer=cpu", "trainer.devices=2"],
    }
    (ws.root / "empty_model").mkdir(exist_ok=True)
    for name, over in bad.items():
        yield name, "error", lambda over=over, name=name: (run(merge(ws.folder_args(ws.out("cfg")), over)), None)

    def sweep_on_processes():
        out = ws.out("ddp_sweep")
        return run(["-m", *merge(ws.folder_args(out), [*DDP, "K=3,4", f"hydra.sweep.dir={out}"])]), None

    yield "a local sweep (-m) on 2 processes", "error", sweep_on_processes


def data_cases(ws: Workspace):
    """Missing, empty, corrupt inputs."""
    root = ws.root
    (root / "empty").mkdir(exist_ok=True)
    (root / "corrupt").mkdir(exist_ok=True)
    (root / "corrupt" / "a.jpg").write_bytes(b"not a jpeg")
    (root / "not_an_image.jpg").write_text("hello")
    data = (ws.images / "astronaut.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "a_file").write_text("x")
    single = lambda p: ["data=single", f"data.path={p}"]  # noqa: E731
    folder = lambda p: ["data=folder", f"data.root={p}"]  # noqa: E731
    cases = {
        "data=single without data.path": ["data=single"],
        "data=folder without data.root": ["data=folder", "data.root=null"],
        "single image missing": single(root / "missing.jpg"),
        "single image is a folder": single(ws.images),
        "single image not an image": single(root / "not_an_image.jpg"),
        "single image truncated": single(root / "truncated.png"),
        "folder missing": folder(root / "missing"),
        "folder is a file": folder(root / "a_file"),
        "folder empty": folder(root / "empty"),
        "folder of corrupt images only": folder(root / "corrupt"),
        "output folder below a file": [f"hydra.run.dir={root / 'a_file' / 'run'}"],
        "store folder is a file": [f"store.dir={root / 'a_file'}"],
    }
    for name, over in cases.items():
        def go(over=over):
            out = ws.out("data")
            base = [a for a in ws.folder_args(out) if not a.startswith(("data=", "data.root="))]
            return run(merge(base, over)), None
        yield name, "error", go


def ok_cases(ws: Workspace):
    """Runs that must work: a folder, one image, a mixed folder (corrupt files skipped), EXIF."""
    import numpy as np
    from PIL import Image

    def folder_ok():
        out = ws.out("ok_folder")
        res = run(ws.folder_args(out))
        return res, lambda: (out / "eigvecs.pt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()

    def single_ok():
        out = ws.out("ok_single")
        args = [a for a in ws.folder_args(out) if not a.startswith(("data=", "data.root=", "base_size"))]
        res = run(["data=single", f"data.path={ws.images / 'astronaut.png'}", *args])
        return res, lambda: (out / "eigvecs.pt").is_file()

    def mixed_ok():
        mixed = ws.root / "mixed"
        mixed.mkdir(exist_ok=True)
        shutil.copy(ws.images / "astronaut.png", mixed / "good.png")
        (mixed / "broken.jpg").write_bytes(b"junk")
        out = ws.out("ok_mixed")
        args = [a for a in ws.folder_args(out) if not a.startswith("data.root=")]
        res = run(merge(args, [f"data.root={mixed}"]))
        return res, lambda: _files(out) == ["good.png"]

    def exif_ok():
        exif = ws.root / "exif"
        exif.mkdir(exist_ok=True)
        a = np.zeros((40, 20, 3), np.uint8)
        a[:, :10] = 255
        im = Image.fromarray(a)
        ex = im.getexif()
        ex[0x0112] = 6
        im.save(exif / "phone.jpg", exif=ex)
        shutil.copy(ws.images / "coffee.png", exif / "coffee.png")
        out = ws.out("ok_exif")
        args = [a for a in ws.folder_args(out) if not a.startswith("data.root=")]
        res = run(merge(args, [f"data.root={exif}"]))
        return res, lambda: (out / "eigvecs.pt").is_file()

    def resume_fresh():
        out = ws.out("ok_resume_fresh")
        res = run([*ws.folder_args(out), "resume=true"])
        return res, lambda: (out / "eigvecs.pt").is_file()

    def duplicate_stems():
        run_dir, labels = ws.copy_run("dup")
        tree = run_dir.parent / "tree"
        for sub, src in (("a", "astronaut.png"), ("b", "coffee.png")):
            (tree / sub).mkdir(parents=True)
            shutil.copy(ws.images / src, tree / sub / "img.png")
        out = run_dir.parent / "r"
        args = [a for a in ws.folder_args(out) if not a.startswith("data.root=")]
        res = run(merge(args, [f"data.root={tree}"]))
        if res["rc"] != 0:
            return res, None
        lab = run_dir.parent / "labels_tree"
        for sub, src in (("a", "astronaut.png"), ("b", "coffee.png")):
            (lab / sub).mkdir(parents=True)
            shutil.copy(labels / src, lab / sub / "img.png")
        return run([str(out), "--labels", str(lab), "--figures", "0"], "ldsc.evaluate"), \
            lambda: (out / "eval" / "metrics.json").is_file()

    def folder_on_processes():
        out = ws.out("ok_ddp")
        res = run(merge(ws.folder_args(out), DDP))
        return res, lambda: all((out / f).is_file() for f in ("eigvecs.pt", "stages.rank1.json", "checkpoints/last.ckpt"))

    yield "a folder run", "ok", folder_ok
    yield "a folder run on 2 processes", "ok", folder_on_processes
    yield "a single-image run", "ok", single_ok
    yield "corrupt files among good ones are skipped", "ok", mixed_ok
    yield "EXIF-rotated photo", "ok", exif_ok
    yield "resume=true in a fresh folder", "ok", resume_fresh
    yield "same file name in two subfolders, labels by relative path", "ok", duplicate_stems


def _files(out: Path) -> list[str]:
    import torch

    try:
        return sorted(Path(f).name for f in torch.load(out / "eigvecs.pt", weights_only=True)["files"])
    except Exception:
        return []


def checkpoint_cases(ws: Workspace):
    """Damaged checkpoints and eigenvector files, signals, concurrency, failed exports."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ws.root / 'PWNED'}",))

    def resumed(damage):
        def go():
            out = ws.out(f"ckpt_{damage}")
            res = run(ws.folder_args(out))
            assert res["rc"] == 0, res["stderr"][-1000:]
            ckpt = out / "checkpoints" / "last.ckpt"
            before = (out / "eigvecs.pt").read_bytes()
            if damage == "truncated":
                ckpt.write_bytes(ckpt.read_bytes()[:1000])
            elif damage == "pickle":
                state = torch.load(ckpt, weights_only=False)
                state["x"] = Payload()
                torch.save(state, ckpt)
            elif damage == "other run":
                other = ws.out("other")
                run(merge(ws.folder_args(other), ["K=3"]))
                shutil.copy(other / "checkpoints" / "last.ckpt", ckpt)
            res = run([*ws.folder_args(out), "resume=true"])
            intact = (out / "eigvecs.pt").read_bytes() == before and not (ws.root / "PWNED").exists()
            return res, intact
        return go

    for damage in ("truncated", "pickle", "other run"):
        def case(go=resumed(damage)):
            res, intact = go()
            return res, None if intact else (lambda: False)
        yield f"resume from a {damage} checkpoint", "error", case

    def evaluate_damaged(damage):
        def go():
            run_dir, labels = ws.copy_run(f"eig_{damage}")
            f = run_dir / "eigvecs.pt"
            if damage == "pickle":
                torch.save({"eigvecs": torch.zeros(1), "x": Payload()}, f)
            elif damage == "truncated":
                f.write_bytes(f.read_bytes()[:500])
            elif damage == "missing":
                f.unlink()
            res = run([str(run_dir), "--figures", "0"], "ldsc.evaluate")
            return res, None if not (ws.root / "PWNED").exists() else (lambda: False)
        return go

    for damage in ("pickle", "truncated", "missing"):
        yield f"evaluate a {damage} eigvecs.pt", "error", evaluate_damaged(damage)

    def long_args(out, epochs=100000, tol=0):
        return merge(ws.folder_args(out), [f"solver.tol={tol}", "solver.iters_per_step=1", f"trainer.max_epochs={epochs}"])

    def wait_for(path, proc, limit=180, poll=0.2):
        t = time.time()
        while not path.exists() and proc.poll() is None and time.time() - t < limit:
            time.sleep(poll)

    def signalled(sig, extra=()):
        def go():
            out = ws.out(f"sig{sig}")
            proc = subprocess.Popen([sys.executable, "-m", "ldsc.run", *long_args(out), *extra], env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for(out / "checkpoints" / "last.ckpt", proc)
            proc.send_signal(sig)
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                return {"rc": None, "stderr": "", "stdout": ""}, None
            res = {"rc": proc.returncode, "stderr": err, "stdout": ""}
            ok = proc.returncode == 128 + sig and (out / "checkpoints" / "last.ckpt").is_file()
            return res, None if ok else (lambda: False)
        return go

    yield "SIGTERM during a run", "error", signalled(signal.SIGTERM)
    yield "SIGINT (Ctrl-C) during a run", "error", signalled(signal.SIGINT)
    yield "SIGTERM to a run on 2 processes", "error", signalled(signal.SIGTERM, DDP)

    def kill9_resume():
        full, split = ws.out("full"), ws.out("split")
        run(long_args(full, 150))
        proc = subprocess.Popen([sys.executable, "-m", "ldsc.run", *long_args(split, 150)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(split / "checkpoints" / "last.ckpt", proc, poll=0.005)
        proc.send_signal(signal.SIGSTOP)  # frozen at its first checkpoint (no race with its end)
        proc.kill()
        proc.communicate()
        res = run([*long_args(split, 150), "resume=true"])
        a, b = (torch.load(d / "eigvecs.pt", weights_only=True)["eigvecs"] for d in (full, split)) \
            if res["rc"] == 0 else (None, None)
        return res, lambda: a is not None and torch.allclose(a, b)

    yield "kill -9 then resume=true equals an uninterrupted run", "ok", kill9_resume

    def busy_folder():
        out = ws.out("busy")
        proc = subprocess.Popen([sys.executable, "-m", "ldsc.run", *long_args(out)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(out / "checkpoints" / "last.ckpt", proc)
        res = run(long_args(out, 2))
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        return res, None

    yield "a second run in a busy folder", "error", busy_folder

    def failed_export():
        out = ws.out("export")
        (out / "eigvecs.pt").mkdir(parents=True)  # the export cannot replace a folder
        res = run([*ws.folder_args(out), "overwrite=true"])
        kept = (out / "checkpoints" / "last.ckpt").is_file()
        return res, None if kept else (lambda: False)

    yield "the export cannot be written", "error", failed_export

    def resume_keeps_metrics():
        out = ws.out("metrics")
        args = [a for a in ws.folder_args(out) if a != "logger=none"]
        run(args)
        before = (out / "csv" / "metrics.csv").read_text() if (out / "csv" / "metrics.csv").exists() else None
        res = run(merge(args, ["resume=true", "trainer.max_epochs=3"]))
        return res, lambda: before is not None and (out / "csv" / "metrics.csv").read_text() == before

    yield "resume keeps the earlier run's metrics.csv", "ok", resume_keeps_metrics


def evaluate_cases(ws: Workspace):
    """``python -m ldsc.evaluate`` on bad label folders, moved images, bad options."""
    import numpy as np
    from PIL import Image

    def case(damage, extra=()):
        def go():
            run_dir, labels = ws.copy_run(f"ev_{damage}")
            args = [str(run_dir), "--labels", str(labels), "--figures", "0", *extra]
            lab = labels / "coffee.png"
            h, w = np.asarray(Image.open(lab)).shape
            if damage == "no run folder":
                args[0] = str(run_dir.parent / "nope")
            elif damage == "no label folder":
                args[2] = str(run_dir.parent / "nolabels")
            elif damage == "a label missing":
                lab.unlink()
            elif damage == "a label of the wrong size":
                Image.fromarray(np.zeros((10, 10), np.uint8)).save(lab)
            elif damage == "an RGB label":
                Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(lab)
            elif damage == "a label above 255":
                Image.fromarray(np.full((h, w), 300, np.uint16)).save(lab)
            elif damage == "a truncated label":
                lab.write_bytes(lab.read_bytes()[:100])
            elif damage == "labels all 255":
                for f in labels.glob("*.png"):
                    a = np.asarray(Image.open(f))
                    Image.fromarray(np.full(a.shape, 255, np.uint8)).save(f)
            elif damage == "images moved since the run":
                moved = run_dir.parent / "images_moved"
                shutil.copytree(ws.images, moved)
                import torch
                state = torch.load(run_dir / "eigvecs.pt", weights_only=True)
                state["files"] = [str(run_dir.parent / "gone" / Path(f).name) for f in state["files"]]
                torch.save(state, run_dir / "eigvecs.pt")
            elif damage == "--out below a file":
                (run_dir.parent / "f").write_text("x")
                args += ["--out", str(run_dir.parent / "f" / "eval")]
            return run(args, "ldsc.evaluate"), None
        return go

    for damage in ("no run folder", "no label folder", "a label missing", "a label of the wrong size", "an RGB label",
                   "a label above 255", "a truncated label", "labels all 255", "images moved since the run",
                   "--out below a file"):
        yield f"evaluate: {damage}", "error", case(damage)
    yield "evaluate: --clusters 0", "error", case("clusters", ["--clusters", "0"])
    yield "evaluate: --clusters abc", "error", case("clusters_abc", ["--clusters", "abc"])
    yield "evaluate: --num-classes below the classes present", "error", case("num_classes", ["--num-classes", "1"])
    yield "evaluate: --eval-size 0", "error", case("eval_size", ["--eval-size", "0"])

    def ok():
        run_dir, labels = ws.copy_run("ev_ok")
        res = run([str(run_dir), "--labels", str(labels), "--figures", "1"], "ldsc.evaluate")
        return res, lambda: json.loads((run_dir / "eval" / "metrics.json").read_text())["miou"] >= 0

    yield "evaluate: a finished run with its labels", "ok", ok


def _eig(out: Path):
    import torch

    try:
        return torch.load(out / "eigvecs.pt", weights_only=True)["eigvecs"]
    except Exception:
        return None


def _same(a, b) -> bool:
    """The same eigenvectors up to the sign of each (a reused store must give the fresh answer)."""
    import torch

    if a is None or b is None or a.shape != b.shape:
        return False
    sign = torch.sign((a * b).sum(dim=(0, 2, 3)))[None, :, None, None]
    return torch.allclose(a, b * sign, atol=1e-4)


def store_cases(ws: Workspace):
    """The feature store under this run's key: damaged, edited, someone else's, stale; a full disk."""
    import numpy as np

    def fresh(name: str, extra=()):
        """A run with its own new store; returns (run folder, its store folder)."""
        out = ws.out(name)
        args = merge(ws.folder_args(out), [f"store.dir={out / 'store'}", *extra])
        res = run(args)
        assert res["rc"] == 0, res["stderr"][-1500:]
        return out, next((out / "store").iterdir())

    def damaged(how: str):
        def go():
            ref, store = fresh(f"store_{how.replace(' ', '_')}")
            arrays = sorted(store.glob("*.npy"))
            if how == "truncated array":
                arrays[0].write_bytes(arrays[0].read_bytes()[: arrays[0].stat().st_size // 2])
            elif how == "header-zeroed array":
                data = bytearray(arrays[0].read_bytes())
                data[:128] = bytes(128)
                arrays[0].write_bytes(bytes(data))
            elif how == "missing array":
                arrays[0].unlink()
            elif how == "invalid meta.json":
                (store / "meta.json").write_text("{not json")
            elif how == "edited meta.json":
                meta = json.loads((store / "meta.json").read_text())
                meta["n_images"] = 5
                (store / "meta.json").write_text(json.dumps(meta))
            elif how in ("other settings", "other images"):  # another run's store moved under this key
                other_extra = ["backbone.sigma_color=30"] if how == "other settings" else []
                if how == "other images":
                    single = ws.root / "one_image"
                    single.mkdir(exist_ok=True)
                    shutil.copy(ws.images / "coffee.png", single / "coffee.png")
                    shutil.copy(ws.images / "coffee.png", single / "coffee2.png")
                    other_extra = [f"data.root={single}"]
                _, other = fresh(f"other_{how.replace(' ', '_')}", other_extra)
                shutil.rmtree(store)
                shutil.copytree(other, store)
            out = ws.out("store_rerun")
            res = run(merge(ws.folder_args(out), [f"store.dir={store.parent}"]))
            return res, lambda: _same(_eig(out), _eig(ref))
        return go

    for how in ("truncated array", "header-zeroed array", "missing array", "invalid meta.json", "edited meta.json",
                "other settings", "other images"):
        yield f"store: {how} under this run's key is rebuilt", "ok", damaged(how)

    def stale_content():
        from PIL import Image

        folder = ws.root / "bmp"
        folder.mkdir(exist_ok=True)
        a = np.zeros((48, 64, 3), np.uint8)
        a[:, :32] = (200, 30, 30)
        Image.fromarray(a).save(folder / "a.bmp")
        shutil.copy(ws.images / "coffee.png", folder / "coffee.png")
        store = ws.root / "bmp_store"
        first = ws.out("bmp_first")
        run(merge(ws.folder_args(first), [f"data.root={folder}", f"store.dir={store}"]))
        st = (folder / "a.bmp").stat()
        b = a.copy()
        b[:24] = (20, 200, 20)  # new content, same size (uncompressed), same modification time
        Image.fromarray(b).save(folder / "a.bmp")
        os.utime(folder / "a.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (folder / "a.bmp").stat().st_size == st.st_size
        second, ref = ws.out("bmp_second"), ws.out("bmp_ref")
        res = run(merge(ws.folder_args(second), [f"data.root={folder}", f"store.dir={store}"]))
        run(merge(ws.folder_args(ref), [f"data.root={folder}", f"store.dir={ws.root / 'bmp_store_fresh'}"]))
        return res, lambda: _same(_eig(second), _eig(ref)) and not _same(_eig(second), _eig(first))

    yield "store: an image rewritten with the same size and time is read again", "ok", stale_content

    def full_disk_store():
        out = ws.out("full_store")
        with small_disk(ws.root / "small_store", 200) as (folder, limit):
            res = run(merge(ws.folder_args(out), [f"store.dir={folder}"]), file_limit=limit)
            left = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return res, None if left == 0 else (lambda: False)

    yield "store: a full disk while the store is written", "error", full_disk_store


class small_disk:
    """A folder on a tiny file system: a ``tmpfs`` of ``kb`` KiB when this process may mount one
    (root), else an ordinary folder plus a file-size limit (``RLIMIT_FSIZE``) for the run.
    ``with small_disk(path, kb) as (folder, file_limit)``."""

    def __init__(self, path: Path, kb: int):
        self.path, self.kb, self.mounted = Path(path), int(kb), False

    def __enter__(self):
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and shutil.which("mount"):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.kb}k", "tmpfs", str(self.path)],
                               capture_output=True)
            self.mounted = r.returncode == 0
        return self.path, (None if self.mounted else self.kb * 1024)

    def __exit__(self, *exc):
        if self.mounted:
            subprocess.run(["umount", str(self.path)], capture_output=True)


def output_cases(ws: Workspace):
    """The run folder: stubs, locks, overwrites, a full disk at the checkpoint, outputs among the images."""

    def refused_leaves_nothing():
        logs = ws.root / "stub_logs"
        res = run(merge(ws.folder_args(ws.out("unused")), ["K=5000", f"paths.log_dir={logs}",
                                                           "hydra.run.dir=${paths.log_dir}/runs/${now:%H-%M-%S}"]))
        return res, None if not logs.exists() else (lambda: False)

    yield "a refused run leaves no folder behind", "error", refused_leaves_nothing

    def lock_released():
        out = ws.out("lock")
        res = run(ws.folder_args(out))
        return res, lambda: not (out / ".ldsc.lock").exists()

    yield "the lock file is removed when a run ends", "ok", lock_released

    def stale_lock():
        out = ws.out("stale_lock")
        out.mkdir(parents=True)
        (out / ".ldsc.lock").write_text("pid 999999")  # left by a killed run
        res = run(ws.folder_args(out))
        return res, lambda: (out / "eigvecs.pt").is_file() and "taking over the lock" in res["stdout"] + res["stderr"]

    yield "a stale lock left by a killed run is taken over", "ok", stale_lock

    def no_overwrite():
        out = ws.out("no_overwrite")
        run(ws.folder_args(out))
        before = (out / "eigvecs.pt").read_bytes()
        res = run(merge(ws.folder_args(out), ["K=3"]))
        return res, None if (out / "eigvecs.pt").read_bytes() == before else (lambda: False)

    yield "a second run into a finished folder without resume=true", "error", no_overwrite

    def overwrite_ok():
        out = ws.out("overwrite")
        run(ws.folder_args(out))
        res = run(merge(ws.folder_args(out), ["K=3", "overwrite=true"]))
        return res, lambda: _eig(out) is not None and _eig(out).shape[1] == 3

    yield "overwrite=true replaces a finished run", "ok", overwrite_ok

    def full_disk_checkpoint():
        out = ws.out("full_ckpt")
        run(ws.folder_args(ws.out("warm_store")))  # the store exists: only the run's own files are written
        with small_disk(ws.root / "small_ckpt", 64) as (folder, limit):
            run_dir = folder / "run"
            filler = folder / "filler"
            if limit is None:  # a real small disk: leave ~24 KiB, less than a checkpoint
                with open(filler, "wb") as fh:
                    try:
                        fh.write(b"\0" * (40 * 1024))
                    except OSError:
                        pass
            res = run(merge(ws.folder_args(out), [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null",
                                                  "hydra.job_logging.root.handlers=[console]"]),
                      file_limit=24 * 1024 if limit else None)
            left = list(run_dir.rglob("*.tmp")) + list(run_dir.rglob(".*.tmp"))
        return res, None if not left else (lambda: False)

    yield "a full disk while the checkpoint is written", "error", full_disk_checkpoint

    def outputs_in_image_folder():
        images = ws.root / "images_with_outputs"
        shutil.copytree(ws.images, images)
        run(merge(ws.folder_args(ws.out("x")), [f"data.root={images}", f"hydra.run.dir={images / 'run1'}",
                                                "callbacks.export.figures=true"]))
        out = ws.out("after_outputs")
        res = run(merge(ws.folder_args(out), [f"data.root={images}"]))
        return res, lambda: _files(out) == ["astronaut.png", "coffee.png"]

    yield "outputs written inside the image folder are not read as images", "ok", outputs_in_image_folder

    def misspelt_group():
        res = run([*ws.folder_args(ws.out("typo")), "grpah=vv"])
        return res, None if "graph=vv" in res["stderr"] else (lambda: False)

    yield "a misspelt group (grpah=vv) names the right one", "error", misspelt_group

    def weights_online():
        env = {k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}
        res = run([*ws.folder_args(ws.out("dino")), "backbone=dino"], env=env)
        quick = res["s"] < 30 and "Retrying" not in res["stderr"] + res["stdout"]
        return res, None if quick else (lambda: False)

    yield "backbone=dino without weights, online mode: quick and quiet", "error", weights_online


def resume_cases(ws: Workspace):
    """``resume=true`` with other settings, other images or fewer epochs; sweeps with a refused job."""

    def resumed_with(extra, name, add_image=False):
        def go():
            images = ws.root / f"images_{name}"
            shutil.copytree(ws.images, images)
            out = ws.out(f"resume_{name}")
            args = merge(ws.folder_args(out), [f"data.root={images}", "trainer.max_epochs=4", "solver.tol=0",
                                               "solver.iters_per_step=1"])
            run(args)
            before = (out / "eigvecs.pt").read_bytes()
            if add_image:
                shutil.copy(ws.images / "coffee.png", images / "coffee_copy.png")
            res = run(merge(args, ["resume=true", *extra]))
            return res, None if (out / "eigvecs.pt").read_bytes() == before else (lambda: False)
        return go

    yield "resume=true with another graph setting", "error", resumed_with(["graph.k_intra=5", "trainer.max_epochs=8"], "graph")
    yield "resume=true with other images", "error", resumed_with(["trainer.max_epochs=8"], "images", add_image=True)
    yield "resume=true with a lower trainer.max_epochs", "error", resumed_with(["trainer.max_epochs=2"], "epochs")

    def sweep_with_refused_job():
        out = ws.out("sweep")
        res = run(["-m", *merge(ws.folder_args(out), ["K=3,5000", f"hydra.sweep.dir={out}"])])
        return res, None if (out / "0_pixel_qk_K3" / "eigvecs.pt").is_file() else (lambda: False)

    yield "a sweep (-m) in which one job is refused", "error", sweep_with_refused_job


def more_signal_cases(ws: Workspace):
    """SIGINT twice, SIGINT before the solver, SIGHUP."""

    def long_args(out):
        return merge(ws.folder_args(out), ["solver.tol=0", "solver.iters_per_step=1", "trainer.max_epochs=100000"])

    def start(args):
        return subprocess.Popen([sys.executable, "-m", "ldsc.run", *args], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(proc, expect_rc):
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return {"rc": None, "stderr": "", "stdout": ""}, None
        res = {"rc": proc.returncode, "stderr": err, "stdout": out}
        return res, None if proc.returncode == expect_rc else (lambda: False)

    def training(name: str):
        """A long run, once it is training (its first checkpoint is written)."""
        out = ws.out(name)
        proc = start(long_args(out))
        t = time.time()
        while not (out / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() - t < 180:
            time.sleep(0.05)
        return proc

    def sigint_twice():
        proc = training("sigint2")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        return finish(proc, 130)

    yield "SIGINT twice (Ctrl-C Ctrl-C)", "error", sigint_twice

    def sigint_early():
        many = ws.root / "many_images"
        if not many.exists():
            many.mkdir()
            for i in range(300):
                shutil.copy(ws.images / "coffee.png", many / f"c{i:03d}.png")
        out = ws.out("sigint_early")
        proc = start(merge(ws.folder_args(out), [f"data.root={many}"]))
        first = proc.stdout.readline()  # the run's first line: Hydra is up, the images come next
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        res, check = finish(proc, 130)
        res["stdout"] = first + res["stdout"]
        return res, check

    yield "SIGINT while the images are being checked", "error", sigint_early

    def sighup():
        proc = training("sighup")
        proc.send_signal(signal.SIGHUP)
        return finish(proc, 128 + signal.SIGHUP)

    yield "SIGHUP (the terminal closed)", "error", sighup


def more_evaluate_cases(ws: Workspace):
    """``--clusters`` above the pixels, NaN in ``eigvecs.pt``; memory of a single huge image."""
    import torch

    def clusters_too_many():
        run_dir, labels = ws.copy_run("ev_many_clusters")
        return run([str(run_dir), "--labels", str(labels), "--figures", "0", "--clusters", "100000"],
                   "ldsc.evaluate"), None

    yield "evaluate: --clusters above the number of pixels", "error", clusters_too_many

    def nan_eigvecs():
        run_dir, labels = ws.copy_run("ev_nan")
        state = torch.load(run_dir / "eigvecs.pt", weights_only=True)
        state["eigvecs"][0, 0, 0, 0] = float("nan")
        torch.save(state, run_dir / "eigvecs.pt")
        return run([str(run_dir), "--labels", str(labels), "--figures", "0"], "ldsc.evaluate"), None

    yield "evaluate: NaN in eigvecs.pt", "error", nan_eigvecs

    def huge_single():
        args = [a for a in ws.folder_args(ws.out("huge")) if not a.startswith(("data=", "data.root=", "base_size"))]
        return run(["data=single", f"data.path={ws.images / 'astronaut.png'}", *args, "base_size=2048"]), None

    yield "a single image with base_size=2048 (memory)", "error", huge_single


def extend_cases(ws: Workspace):
    """``python -m ldsc.extend``: new images into a finished run; settings, folders and files it refuses."""
    from PIL import Image
    from skimage import data as skdata

    new = ws.root / "new_images"
    if not new.exists():
        new.mkdir()
        Image.fromarray(skdata.chelsea()).save(new / "chelsea.png")
        (new / "broken.jpg").write_bytes(b"not an image")

    def ext(name, extra, damage=None, works=False):
        def go():
            run_dir, _ = ws.copy_run(name)
            if damage:
                damage(run_dir)
            res = run([str(run_dir), *merge(["data=folder", f"data.root={new}"], extra)], "ldsc.extend")
            written = (run_dir / "extend" / "eigvecs.pt").is_file()
            return res, (lambda: written) if works else (lambda: not written)  # refused: nothing written
        return go

    yield "extend: new images into a finished run", "ok", ext("ext_ok", [], works=True)
    yield "extend: graph.k_intra changed", "error", ext("ext_graph", ["graph.k_intra=5"])
    yield "extend: backbone changed", "error", ext("ext_backbone", ["backbone=clip"])
    yield "extend: misspelt key", "error", ext("ext_typo", ["data.rooot=x"])
    yield "extend: images folder missing", "error", ext("ext_missing", [f"data.root={ws.root / 'nowhere'}"])
    yield "extend: fit.safetensors missing", "error", ext("ext_no_model", [],
                                                         lambda d: (d / "fit.safetensors").unlink())
    yield "extend: fit.safetensors damaged", "error", ext("ext_bad_model", [],
                                                         lambda d: (d / "fit.safetensors").write_bytes(b"\0" * 32))
    yield "extend: the run's feature store deleted", "error", ext(
        "ext_no_store", [], lambda d: shutil.rmtree(ws.root / "store", ignore_errors=True))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--out", default=str(REPO / "notes" / "measurements" / "fault_cases.jsonl"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ldsc_faults_"))
    ws = Workspace(root)
    counts: dict[str, int] = {}
    lines = []
    try:
        for group in (ok_cases, config_cases, data_cases, checkpoint_cases, evaluate_cases, store_cases, output_cases,
                      resume_cases, more_signal_cases, more_evaluate_cases, extend_cases):
            for name, expect, go in group(ws):
                if args.only and not any(s in name for s in args.only.split(",")):
                    continue
                res, check = go()
                outcome = classify(res, expect, check)
                if expect == "error" and outcome == "clean" and check is not None and not check():
                    outcome = "silent"  # refused, but lost or damaged something on the way
                counts[outcome] = counts.get(outcome, 0) + 1
                last = next((ln for ln in reversed(res["stderr"].strip().splitlines()) if ln.strip()), "")
                line = {"case": name, "expect": expect, "outcome": outcome, "rc": res["rc"], "last_line": last[:300]}
                lines.append(line)
                print(json.dumps(line), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = {"cases": sum(counts.values()), **counts}
    print(json.dumps(summary), flush=True)
    if not args.only:
        Path(args.out).write_text("".join(json.dumps(x) + "\n" for x in [*lines, summary]))


if __name__ == "__main__":
    main()
