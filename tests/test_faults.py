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
