"""``python -m ldsc.layers``: the layers a backbone captures, as a run would load the backbone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model_dir

from ldsc.layers import main


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def table(capsys, args):
    assert main(args) == 0
    return capsys.readouterr().out.splitlines()


def test_lists_every_layer_with_grid_heads_and_dropped_tokens(capsys):
    lines = table(capsys, ["backbone=dinov2_reg", f"backbone.model_id={tiny_model_dir('dinov2_reg')}",
                           "backbone.input_size=48", "backbone.layers=[-1]"])
    assert lines[0].startswith("backbone: ") and "Dinov2WithRegistersModel" in lines[0] and "48 px" in lines[0]
    header, rows = lines[1].split(), [line.split() for line in lines[2:-1]]
    assert header[:3] == ["#", "name", "module"]
    assert [r[1] for r in rows] == ["layer.0", "layer.1"]
    assert all(r[3:7] == ["6x6", "2", "16", "5"] for r in rows)  # 48 px / patch 8; class + 4 registers
    assert rows[0][-1] != "yes" and rows[1][-1] == "yes"
    assert lines[-1] == "1 of 2 layers captured"


def test_stable_diffusion_lists_the_layers_max_grid_leaves_out(capsys):
    lines = table(capsys, ["backbone=sd", f"backbone.model_id={tiny_model_dir('sd')}", "backbone.input_size=64",
                           "backbone.max_grid=4"])
    rows = [line.split() for line in lines[2:-1]]
    assert len(rows) == 7 and rows[0][1].startswith("down_blocks.0") and rows[2][1].startswith("mid_block")
    assert {r[2] for r in rows if r[-1] == "yes"} == {"2x2", "4x4"}
    assert lines[-1] == "3 of 7 layers captured"


@pytest.mark.parametrize("args,expected", [
    (["backbone=dinov4"], "Unknown backbone 'dinov4': did you mean backbone=dinov2?"),
    (["backbone=hf"], "backbone.model_id is not set"),
    (["backbone=hf", "backbone.model_id=/no/such/folder"], "the folder '/no/such/folder' does not exist"),
    (["backbone=dino", "backbone.modelid=x"], "did you mean backbone.model_id=x?"),
])
def test_bad_input_is_one_sentence(capsys, args, expected):
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldsc.layers: error: ") and expected in err and "\n" not in err
