"""Files a user receives or a crash leaves behind: refused in one sentence, never executed."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from ldsc.atomic import atomic_torch_save
from ldsc.errors import DataError
from ldsc.export import load_eigenvectors, save_eigenvectors


class _Payload:
    """Unpickling this runs code (``os.system``-like via __reduce__): what a crafted file would do."""

    def __reduce__(self):
        return (os.makedirs, ("PWNED_BY_PICKLE",))


def test_a_crafted_pickle_in_eigvecs_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"eigvecs": torch.zeros(1, 2, 4, 4), "evil": _Payload()}, tmp_path / "eigvecs.pt")
    with pytest.raises(DataError, match="objects other than tensors and plain containers"):
        load_eigenvectors(tmp_path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_a_truncated_eigvecs_is_named_in_one_sentence(tmp_path):
    save_eigenvectors(tmp_path, torch.randn(2, 3, 4, 4), ["a.png", "b.png"])
    data = (tmp_path / "eigvecs.pt").read_bytes()
    (tmp_path / "eigvecs.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable eigvecs.pt"):
        load_eigenvectors(tmp_path)


def test_exported_eigenvectors_load_with_weights_only(tmp_path):
    save_eigenvectors(tmp_path, torch.randn(2, 3, 4, 4), ["a.png", "b.png"], config={"K": 3, "graph": {"k": [1, 2]}})
    run = load_eigenvectors(tmp_path)
    assert run["eigvecs"].shape == (2, 3, 4, 4) and run["files"] == ["a.png", "b.png"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "eigvecs.pt"
    atomic_torch_save({"eigvecs": torch.ones(1)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("cannot pickle this")

    with pytest.raises(pickle.PicklingError):
        atomic_torch_save({"eigvecs": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["eigvecs"], torch.ones(1))
    assert not list(tmp_path.glob(".*.tmp"))


def _start(args, tmp_path):
    """``python -m ldsc.run ARGS`` started in the background (a real process that can be signalled)."""
    import subprocess
    import sys

    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "ldsc.run", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=180, poll=0.2):
    import time

    t = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} was written: {proc.communicate()[1][-2000:]}"
        assert time.time() - t < timeout, f"{path} was not written within {timeout} s"
        time.sleep(poll)


def _long_run(tmp_path, name, epochs, tol=0):
    """A tiny data-set run that keeps iterating (tolerance 0) for ``epochs`` epochs of one LOBPCG
    iteration, checkpointing every epoch."""
    from conftest import TINY

    return [*TINY, f"solver.tol={tol}", "solver.iters_per_step=1", f"trainer.max_epochs={epochs}",
            f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / name}"]


def test_sigterm_saves_a_checkpoint_exits_nonzero_and_the_run_resumes(tmp_path):
    import signal

    from conftest import run_cli

    args = _long_run(tmp_path, "run", 100000)
    proc = _start(args, tmp_path)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _wait_for(ckpt, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ldsc: error: Stopped by SIGTERM") and "resume=true" in last, err[-2000:]
    assert "Traceback" not in err
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert int(state["state_dict"]["iterations"]) >= 1
    # resuming (now with the default tolerance) finishes the run
    res = run_cli([*_long_run(tmp_path, "run", 100000, tol=1e-3), "resume=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_eigenvectors(tmp_path / "run")["eigvecs"].shape == (2, 4, 16, 16)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    import signal
    import time

    from conftest import run_cli

    epochs = 150
    full = run_cli(_long_run(tmp_path, "full", epochs))
    assert full.returncode == 0, full.stderr[-2000:]
    proc = _start(_long_run(tmp_path, "split", epochs), tmp_path)
    ckpt = tmp_path / "split" / "checkpoints" / "last.ckpt"
    # frozen at once when its first checkpoint appears (no sleep: a loaded machine could otherwise
    # let it finish first), then killed wherever it was
    _wait_for(ckpt, proc, poll=0.005)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"]
    assert done < epochs - 1, "the run finished before it was killed: the test would not test resuming"
    metrics = tmp_path / "split" / "csv" / "metrics.csv"
    before = metrics.read_text() if metrics.exists() else None
    res = run_cli([*_long_run(tmp_path, "split", epochs), "resume=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    if before is not None:  # what the killed run logged is kept; the resumed run logs beside it
        assert metrics.read_text() == before
        assert (tmp_path / "split" / "csv" / "resume1" / "metrics.csv").is_file()
    a = load_eigenvectors(tmp_path / "full")["eigvecs"]
    b = load_eigenvectors(tmp_path / "split")["eigvecs"]
    torch.testing.assert_close(a, b)


def test_a_second_run_in_a_busy_folder_is_refused(compose, tmp_path):
    from conftest import TINY

    from ldsc.atomic import folder_lock
    from ldsc.errors import ConfigError
    from ldsc.run import fit

    cfg = compose(TINY, out=tmp_path / "busy")
    with folder_lock(tmp_path / "busy"):  # another run holds the folder
        with pytest.raises(ConfigError, match="is in use by another run"):
            fit(cfg)
    fit(cfg)  # free again: the run goes ahead
    assert (tmp_path / "busy" / "eigvecs.pt").is_file()


def test_exif_orientation_is_applied_when_images_are_read(tmp_path):
    """A phone photo stores its pixels sideways plus an orientation tag: ldsc reads it upright,
    and reports the upright size to the evaluation's label-map check."""
    import numpy as np
    from PIL import Image

    from ldsc.features.images import image_size, load_image

    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    im = load_image(tmp_path / "phone.jpg")
    assert im.size == (20, 40) and image_size(tmp_path / "phone.jpg") == (20, 40)
    up = np.asarray(im).mean(2)
    assert up[:15].mean() > 200 and up[25:].mean() < 50  # the white half is now on top


def test_a_failed_export_names_the_folder_and_keeps_the_checkpoint(compose, tmp_path, monkeypatch):
    """A full disk at export time (simulated: the write raises ENOSPC): one sentence, the
    checkpoint written before the export survives, and resuming then exports."""
    import errno

    from conftest import TINY

    import ldsc.export
    from ldsc.run import fit

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = compose(TINY, out=tmp_path / "run")
    monkeypatch.setattr(ldsc.export, "atomic_torch_save", full_disk)
    with pytest.raises(DataError, match="No space left on device.*resume=true"):
        fit(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "eigvecs.pt").exists()
    monkeypatch.undo()
    fit(compose([*TINY, "resume=true"], out=tmp_path / "run"))
    assert load_eigenvectors(tmp_path / "run")["eigvecs"].shape == (2, 4, 16, 16)


@pytest.mark.parametrize("damage,pattern", [
    ("truncate", "is not a readable ldsc checkpoint"),
    ("pickle", "holds objects other than tensors"),
    ("other_run", "was written by a different run"),
])
def test_bad_checkpoints_are_named_and_earlier_outputs_kept(compose, tmp_path, damage, pattern, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were the payload ever run, it would only write here
    from conftest import TINY

    from ldsc.errors import ConfigError
    from ldsc.run import fit

    out = tmp_path / "run"
    fit(compose(TINY, out=out))
    ckpt = out / "checkpoints" / "last.ckpt"
    before = (out / "eigvecs.pt").read_bytes()
    if damage == "truncate":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 3])
    elif damage == "pickle":
        state = torch.load(ckpt, weights_only=False)
        state["evil"] = _Payload()
        torch.save(state, ckpt)
    else:  # a checkpoint of a run with another K
        fit(compose([*TINY, "K=3"], out=tmp_path / "k3"))
        ckpt.write_bytes((tmp_path / "k3" / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(ConfigError, match=pattern):
        fit(compose([*TINY, "resume=true"], out=out))
    assert (out / "eigvecs.pt").read_bytes() == before  # the earlier run's outputs are untouched


def test_a_signal_before_the_run_started_waits_for_the_runs_own_handler():
    """A Ctrl-C during the entry point's imports (which it would break half-way) is held, then
    delivered to the run's handler: one sentence and 130, never a traceback or a killed interpreter."""
    import signal
    import threading

    from ldsc.interrupt import RunInterrupted, graceful_signals, hold_signals

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        hold_signals()
        # to this thread (the test process has other threads, which do not hold it; the entry point
        # holds the signals before any thread exists, so the threads it starts inherit the mask)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # held: nothing happens here
        with pytest.raises(RunInterrupted, match="before the solver started") as caught:
            with graceful_signals():
                pass
        assert caught.value.exit_code == 130
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def test_a_signal_while_an_image_is_decoded_stops_the_run_rather_than_skipping_the_image(tmp_path, monkeypatch):
    """Ctrl-C lands while PIL decodes: the handler's RunInterrupted must leave load_image as it is
    (it was turned into "cannot be read", the image skipped and the stop deferred to the solver)."""
    import skimage.data
    from PIL import Image

    from ldsc.features import images
    from ldsc.interrupt import RunInterrupted

    path = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(path)

    def interrupted(*args, **kwargs):
        raise RunInterrupted("Stopped by SIGINT before the solver started.", 2)

    monkeypatch.setattr(images.Image, "open", interrupted)
    with pytest.raises(RunInterrupted):
        images.load_image(path)
    with pytest.raises(RunInterrupted):
        images.readable_images([str(path)])
