"""FEC (backbone=fec): the architecture against a loop-by-loop computation of its equations, the
official checkpoint layout loaded strictly, what each layer gives the graphs, and runs end to end
on tiny random instances."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL, run_cli

from ldsc.errors import LdscError
from ldsc.features.backbones.fec import FECBackbone
from ldsc.features.backbones.fec_model import FEC, ClusterMixer, ClusterPool

TINY = dict(depths=(1, 2, 1, 1), dims=(8, 12, 16, 20), mlp_ratios=(2, 2, 2, 2), proposals=(2, 2, 2, 1),
            heads=(2, 2, 3, 2), head_dims=(3, 4, 4, 5), num_classes=7)


def randomised(model: FEC, seed: int = 0) -> FEC:
    """Every parameter drawn at random, layer scales and the similarity's α, β included (at their
    initial values 1e-5, 1, 0 the mixers would hardly show in the logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


# ---------------------------------------------------------------------------- the definition, loop by loop


def group_norm(x, weight, bias, eps=1e-5):
    """GroupNorm with one group: each sample normalised over all its channels and positions."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        mu, var = x[b].mean(), x[b].var(unbiased=False)
        out[b] = (x[b] - mu) / math.sqrt(var + eps) * weight.view(-1, 1, 1) + bias.view(-1, 1, 1)
    return out


def conv1x1(x, conv):
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias.view(1, -1, 1, 1)


def cos(a, b):
    return float(a @ b / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12)))


def mean_region(t, r0, r1, c0, c1):
    return t[:, r0:r1, c0:c1].mean((1, 2))


def adaptive_regions(n, m):
    """The index ranges of adaptive average pooling from n to m cells."""
    return [(math.floor(i * n / m), math.ceil((i + 1) * n / m)) for i in range(m)]


def mixer_loops(x, mixer: ClusterMixer, folds: int):
    """The cluster token mixer, one image, head, fold and point at a time."""
    B, _, H, W = x.shape
    e, d, p = mixer.heads, mixer.head_dim, mixer.proposals
    f, v = conv1x1(x, mixer.f), conv1x1(x, mixer.v)
    out = torch.zeros(B, e * d, H, W, dtype=x.dtype)
    fh, fw = H // folds, W // folds
    alpha, beta = float(mixer.sim_alpha), float(mixer.sim_beta)
    for b in range(B):
        for j in range(e):
            fj, vj = f[b, j * d:(j + 1) * d], v[b, j * d:(j + 1) * d]
            for a in range(folds):
                for c in range(folds):
                    r0, c0 = a * fh, c * fw
                    cells = [(r0 + rs, r0 + re, c0 + cs, c0 + ce) for rs, re in adaptive_regions(fh, p)
                             for cs, ce in adaptive_regions(fw, p)]
                    centres = [mean_region(fj, *cell) for cell in cells]
                    centre_values = [mean_region(vj, *cell) for cell in cells]
                    members = [[] for _ in cells]
                    joined = {}
                    for r in range(r0, r0 + fh):
                        for s in range(c0, c0 + fw):
                            sims = [1 / (1 + math.exp(-(beta + alpha * cos(cc, fj[:, r, s])))) for cc in centres]
                            m = max(range(len(sims)), key=lambda i: (sims[i], -i))  # the first of equal maxima
                            members[m].append((r, s))
                            joined[(r, s)] = (m, sims[m])
                    agg = [(centre_values[m] + sum((vj[:, r, s] for r, s in members[m]), torch.zeros(d)))
                           / (len(members[m]) + 1) for m in range(len(cells))]
                    for (r, s), (m, sim) in joined.items():
                        out[b, j * d:(j + 1) * d, r, s] = sim * agg[m]
    return conv1x1(out, mixer.proj)


def pool_loops(x, pool: ClusterPool, folds: int):
    """Cluster pooling, one image, fold and point at a time."""
    B, _, H, W = x.shape
    f, v = conv1x1(x, pool.conv_f), conv1x1(x, pool.conv_v)
    fh, fw = H // folds, W // folds
    ch, cw = fh // 2, fw // 2
    C = f.shape[1]
    out = torch.zeros(B, C, H // 2, W // 2, dtype=x.dtype)
    for b in range(B):
        for a in range(folds):
            for c in range(folds):
                r0, c0 = a * fh, c * fw
                cells = [(r0 + rs, r0 + re, c0 + cs, c0 + ce) for rs, re in adaptive_regions(fh, ch)
                         for cs, ce in adaptive_regions(fw, cw)]
                centres = [mean_region(f[b], *cell) for cell in cells]
                sums = [mean_region(v[b], *cell) for cell in cells]
                counts = [1] * len(cells)
                for r in range(r0, r0 + fh):
                    for s in range(c0, c0 + fw):
                        sims = [cos(cc, f[b, :, r, s]) for cc in centres]
                        m = max(range(len(sims)), key=lambda i: (sims[i], -i))
                        sums[m] = sums[m] + v[b, :, r, s]
                        counts[m] += 1
                for m in range(len(cells)):
                    out[b, :, a * ch + m // cw, c * cw + m % cw] = sums[m] / counts[m]
    skip = F.conv2d(x, pool.conv_skip.weight, pool.conv_skip.bias, stride=2, padding=1)
    return skip + group_norm(out, pool.norm2.weight, pool.norm2.bias)


def fec_loops(model: FEC, images, folds=(1, 1, 1, 1)):
    B, _, H, W = images.shape
    rows = torch.tensor([i / (H - 1) - 0.5 for i in range(H)]).view(1, 1, H, 1).expand(B, 1, H, W)
    cols = torch.tensor([j / (W - 1) - 0.5 for j in range(W)]).view(1, 1, 1, W).expand(B, 1, H, W)
    x = F.conv2d(torch.cat([images, rows, cols], 1), model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                 stride=4)
    stage = 0
    for module in model.network:
        if isinstance(module, ClusterPool):
            stage += 1
            x = pool_loops(x, module, folds[stage])  # a pooling works in the next stage's folds
            continue
        for block in module:
            n1 = group_norm(x, block.norm1.weight, block.norm1.bias)
            x = x + block.layer_scale_1.view(1, -1, 1, 1) * mixer_loops(n1, block.token_mixer, folds[stage])
            n2 = group_norm(x, block.norm2.weight, block.norm2.bias).permute(0, 2, 3, 1)
            hidden = F.gelu(n2 @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
            x = x + block.layer_scale_2.view(1, -1, 1, 1) * (hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias).permute(0, 3, 1, 2)
    pooled = group_norm(x, model.norm.weight, model.norm.bias).mean((2, 3))
    return pooled @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize("folds", [(1, 1, 1, 1), (2, 2, 1, 1)])
def test_the_forward_equals_the_block_equations_computed_loop_by_loop(folds):
    model = randomised(FEC(**TINY, folds=folds)).double()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        logits = model(images)
        assert torch.allclose(logits, fec_loops(model, images, folds), atol=1e-8, rtol=1e-6)


def test_every_point_joins_one_centre_and_the_records_say_which():
    model = randomised(FEC(**TINY))
    mixer = model.network[2][1].token_mixer
    mixer.records = []
    x = torch.randn(2, 12, 8, 8)
    with torch.no_grad():
        mixer(x)
    (r,) = mixer.records
    assert r.f.shape == (2, 2, 8, 8, 4) and r.v.shape == (2, 2, 8, 8, 4) and r.centres == (2, 2)
    # the record is the model's own f projection, head by head
    f = conv1x1(x, mixer.f)
    assert torch.allclose(r.f[1, 1], f[1, 4:8].permute(1, 2, 0), atol=1e-6)
    # each point's centre is the most similar average-pooled centre of its head
    centres = F.adaptive_avg_pool2d(f[0, :4], 2).flatten(1)  # head 0 of image 0: (4, 4 centres)
    sims = F.normalize(centres.T, dim=-1) @ F.normalize(f[0, :4].flatten(1), dim=0)
    assert torch.equal(r.assign[0, 0].flatten(), sims.argmax(0))


# ---------------------------------------------------------------------------- checkpoints


OFFICIAL_KEYS = ["patch_embed.proj.weight", "network.0.0.norm1.weight", "network.0.0.token_mixer.f.weight",
                 "network.0.0.token_mixer.v.bias", "network.0.0.token_mixer.proj.weight",
                 "network.0.0.token_mixer.sim_alpha", "network.0.0.token_mixer.sim_beta", "network.0.0.mlp.fc1.weight",
                 "network.0.0.layer_scale_1", "network.1.conv_f.weight", "network.1.conv_v.weight",
                 "network.1.conv_skip.weight", "network.1.norm2.weight", "network.6.1.layer_scale_2", "norm.weight",
                 "head.bias"]


def official_file(tmp_path, model: FEC, entry: str = "state_dict"):
    """A checkpoint as timm's training script writes it: the weights beside the epoch, the arch and
    the run's arguments (an argparse.Namespace)."""
    path = tmp_path / f"fec_{entry}.pth.tar"
    torch.save({"epoch": 309, "arch": "fec_small", entry: model.state_dict(),
                "args": argparse.Namespace(model="fec_small", lr=1e-3)}, path)
    return path


@pytest.mark.parametrize("entry", ["state_dict", "state_dict_ema"])
def test_an_official_checkpoint_loads_strictly_and_gives_the_same_logits(tmp_path, entry):
    source = randomised(FEC.variant("small"), seed=3)
    assert all(k in source.state_dict() for k in OFFICIAL_KEYS)
    path = official_file(tmp_path, source, entry)
    backbone = FECBackbone(variant="small", checkpoint=str(path))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone.model(images), source(images), atol=1e-5)
    assert not backbone.model.training and not any(p.requires_grad for p in backbone.parameters())


def test_checkpoint_problems_are_one_sentence(tmp_path):
    with pytest.raises(LdscError, match="not on a model hub.*backbone.checkpoint=.*backbone.pretrained=false"):
        FECBackbone(variant="small")
    with pytest.raises(LdscError, match="is not a file"):
        FECBackbone(variant="small", checkpoint=str(tmp_path / "missing.pth.tar"))
    base = official_file(tmp_path, randomised(FEC.variant("base")))
    with pytest.raises(LdscError, match="not an FEC-small checkpoint.*it fits backbone.variant=base"):
        FECBackbone(variant="small", checkpoint=str(base))
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(LdscError, match="cannot be read"):
        FECBackbone(variant="small", checkpoint=str(junk))
    with pytest.raises(ValueError, match="variant must be one of small, base, large"):
        FECBackbone(variant="huge", pretrained=False)


# ---------------------------------------------------------------------------- as a backbone


def test_the_layers_give_f_as_q_and_k_and_v_on_their_input_grids():
    backbone = FECBackbone(variant="small", pretrained=False, input_size=64)
    layers = backbone(torch.rand(2, 3, 64, 64))
    names = [f.name for f in layers]
    assert names[:4] == ["network.0.0.token_mixer", "network.0.1.token_mixer", "network.0.2.token_mixer", "network.1"]
    assert len(names) == 3 + 4 + 5 + 2 + 3  # every block of FEC-small, and the three poolings
    grids = {f.name: f.grid for f in layers}
    assert grids["network.0.0.token_mixer"] == (16, 16) and grids["network.1"] == (16, 16)
    assert grids["network.2.0.token_mixer"] == (8, 8) and grids["network.6.1.token_mixer"] == (2, 2)
    first = layers[0]
    assert first.q is first.k and first.q.shape == (2, 4, 16, 16, 24) and first.v.shape == first.q.shape
    assert first.assign.shape == (2, 4, 16, 16) and first.centres == (4, 4) and int(first.assign.max()) < 16
    pool = layers[3]
    assert pool.q.shape == (2, 1, 16, 16, 64) and pool.centres == (8, 8) and int(pool.assign.max()) < 64
    concat = FECBackbone(variant="small", pretrained=False, input_size=64, heads="concat", layers=["network.*.token_mixer"])
    cl = concat(torch.rand(1, 3, 64, 64))
    assert len(cl) == 14 and cl[0].q.shape == (1, 1, 16, 16, 96)
    with pytest.raises(ValueError, match="matches none of FEC's layers"):
        FECBackbone(variant="small", pretrained=False, layers=["blocks.*"])


@pytest.mark.parametrize("graph", ["qk", "vv"])
def test_single_image_and_four_image_runs_end_to_end(tmp_path, graph, single_image):
    fec = ["backbone=fec", "backbone.pretrained=false", "backbone.input_size=64"]
    one = run_cli([*fec, f"graph={graph}", "data=single", f"data.path={single_image}", *SMALL,
                   f"hydra.run.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert "FEC-small with random weights" in one.stdout + one.stderr
    four = run_cli([*fec, f"graph={graph}", "data.names=[astronaut.png,coffee.png,chelsea.png,rocket.jpg]", *SMALL,
                    f"hydra.run.dir={tmp_path / 'four'}", f"store.dir={tmp_path / 'store'}"])
    assert four.returncode == 0, four.stderr[-3000:]
    run = torch.load(tmp_path / "four" / "eigvecs.pt", weights_only=True)
    assert run["eigvecs"].shape == (4, 4, 16, 16) and torch.isfinite(run["eigvecs"]).all()


# ---------------------------------------------------------------------------- graph=assign


def test_the_co_assignment_operator_equals_the_dense_normalised_graph():
    """W_ij = Σ_heads [i, j in the same image and cluster] + the inter-image kNN similarities;
    S = D^-1/2 W D^-1/2 formed densely here, applied by the graph without forming it."""
    import numpy as np

    from ldsc.graphs.assignment import CoAssignmentGraph, membership_factor
    from ldsc.graphs.dataset import DatasetGraph

    g = torch.Generator().manual_seed(0)
    n, H, h, w, C = 3, 2, 3, 4, 5
    assign = torch.randint(0, C, (n, H, h, w), generator=g)
    T, N = h * w, n * h * w
    # an inter-image graph: a few symmetric edges between points of different images
    Wi = torch.zeros(N, N, dtype=torch.float64)
    for _ in range(12):
        i, j = torch.randint(0, N, (2,), generator=g).tolist()
        if i // T != j // T:
            Wi[i, j] = Wi[j, i] = float(torch.rand(1, generator=g)) + 0.2
    di = Wi.sum(1)
    si = torch.where(di > 0, di.rsqrt(), torch.zeros_like(di))
    inter = DatasetGraph("l", (h, w), n, [(0, (si[:, None] * Wi * si[None, :]).to_sparse_csr())], di)

    Wd = Wi.clone()
    a = assign.reshape(n, H, T)
    for i in range(N):
        for j in range(N):
            if i // T == j // T:
                for head in range(H):
                    ci, cj = a[i // T, head, i % T], a[j // T, head, j % T]
                    if ci == cj:
                        Wd[i, j] += 1.0
    D = Wd.sum(1)
    S = Wd / torch.sqrt(D[:, None] * D[None, :])

    graph = CoAssignmentGraph("l", (h, w), n, membership_factor(assign, C), inter, inter_weight=1.0)
    Y = torch.randn(N, 3, dtype=torch.float64, generator=g)
    assert torch.allclose(graph.degree, D) and torch.allclose(graph.apply(Y), S @ Y, atol=1e-12)
    assert np.allclose(graph.sym_scipy().toarray(), S.numpy(), atol=1e-12)
    assert torch.allclose(graph.walk(Y), (Wd / D[:, None]) @ Y, atol=1e-12)
    # the inter-image edges weighted: W = co-assignment + 2.5 · W_inter
    W2 = Wd - Wi + 2.5 * Wi
    D2 = W2.sum(1)
    weighted = CoAssignmentGraph("l", (h, w), n, membership_factor(assign, C), inter, inter_weight=2.5)
    assert torch.allclose(weighted.apply(Y), (W2 / torch.sqrt(D2[:, None] * D2[None, :])) @ Y, atol=1e-12)
    # auto: the inter-image part gets the co-assignment part's total weight
    auto = CoAssignmentGraph("l", (h, w), n, membership_factor(assign, C), inter)
    assert auto.inter_degree.sum() == pytest.approx(float(auto.degree.sum()) / 2)
    # one head, one image, no inter-image edges: S y is each cluster's mean of y broadcast back
    one = assign[:1, :1]
    alone = CoAssignmentGraph("l", (h, w), 1, membership_factor(one, C))
    y = torch.randn(T, 1, dtype=torch.float64, generator=g)
    labels = one.reshape(-1)
    means = torch.stack([y[labels == labels[i]].mean(0) for i in range(T)])
    assert torch.allclose(alone.apply(y), means, atol=1e-12)


@pytest.mark.parametrize("solver", ["lobpcg", "paper"])
def test_graph_assign_runs_on_one_image_and_on_four(tmp_path, solver, single_image):
    fec = ["backbone=fec", "backbone.pretrained=false", "backbone.input_size=64", "graph=assign", f"solver={solver}"]
    one = run_cli([*fec, "data=single", f"data.path={single_image}", *SMALL, f"hydra.run.dir={tmp_path / 'one'}",
                   f"store.dir={tmp_path / 'store'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    four = run_cli([*fec, "data.names=[astronaut.png,coffee.png,chelsea.png,rocket.jpg]", *SMALL,
                    f"hydra.run.dir={tmp_path / 'four'}", f"store.dir={tmp_path / 'store'}"])
    assert four.returncode == 0, four.stderr[-3000:]
    E = torch.load(tmp_path / "four" / "eigvecs.pt", weights_only=True)["eigvecs"]
    assert E.shape == (4, 4, 16, 16) and torch.isfinite(E).all()
    if solver == "lobpcg":
        assert "joined across images by 25 kNN edges per point" in four.stdout + four.stderr
        # a second run (another K) reuses the feature store (with its integer assignments) and the
        # stored inter-image graphs: no neighbour search
        again = run_cli([*fec, "data.names=[astronaut.png,coffee.png,chelsea.png,rocket.jpg]", *SMALL, "K=3",
                         f"hydra.run.dir={tmp_path / 'again'}", f"store.dir={tmp_path / 'store'}"])
        log = again.stdout + again.stderr
        assert again.returncode == 0 and "feature store: reusing" in log and "cannot be used" not in log, log[-2000:]
        assert "graphs: reusing" in log and "no neighbour search" in log
        stages = json.loads((tmp_path / "again" / "stages.json").read_text())
        assert "reused" in stages["graphs"] and "inter_search_s" not in stages["graphs"]


def test_graph_assign_without_a_clustering_backbone_is_one_sentence(tmp_path):
    r = run_cli(["graph=assign", *SMALL, "data.names=[astronaut.png,coffee.png]", f"hydra.run.dir={tmp_path / 'run'}",
                 f"store.dir={tmp_path / 'store'}"])
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("ldsc: error:")
    assert "needs 'assign' from every layer" in r.stderr and "backbone=fec" in r.stderr


def test_each_poolings_clusters_chain_down_to_the_pixels():
    """A 4x4 first grid on 8x8 pixels (2x2 patches), pooled to 2x2 then to 1x1: the pixels' labels
    follow patch -> first pooling's centre -> second's."""
    import numpy as np

    from ldsc.evaluation.clusters import chain_to_pixels

    first = np.array([[0, 0, 1, 1], [0, 2, 1, 3], [2, 2, 3, 3], [2, 2, 3, 0]])  # 4x4 points -> 4 centres
    second = np.array([[0, 1], [1, 1]])  # 2x2 points -> 2 centres
    after1, after2 = chain_to_pixels((4, 4), [first, second], (8, 8))
    for y in range(8):
        for x in range(8):
            c1 = first[y // 2, x // 2]
            assert after1[y, x] == c1 and after2[y, x] == second.reshape(-1)[c1]


def test_experiment_fec_clusters_draws_the_stages_beside_the_eigenvector_segmentation(tmp_path, single_image):
    from PIL import Image

    r = run_cli(["experiment=fec_clusters", f"data.path={single_image}", "backbone.pretrained=false",
                 "backbone.input_size=64", "base_size=16", "K=4", "trainer.max_epochs=2", "logger=none",
                 "trainer.enable_progress_bar=false", "~callbacks.progress", "callbacks.export.figures=false",
                 f"hydra.run.dir={tmp_path / 'run'}", f"store.dir={tmp_path / 'store'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    (fig,) = (tmp_path / "run" / "figures").glob("cluster_stages_0000_*.png")
    assert Image.open(fig).size[0] > 5 * 200  # input, three poolings, ldsc's segmentation


def test_the_library_fits_fec_features_and_embeds_new_images(single_image):
    from ldsc import LDSC

    backbone = FECBackbone(variant="small", pretrained=False, input_size=64)
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = LDSC(K=4, graph="qk", progress=False).fit(images[:4], backbone=backbone)
    Z = model.transform(images[4:], backbone=backbone)
    assert Z.shape == (1, 4, 16, 16) and torch.isfinite(Z).all()
