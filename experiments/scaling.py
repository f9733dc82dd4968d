"""Scaling of graph construction and of one fast-solver epoch with the number of tokens.

    python experiments/scaling.py                       # 1e4, 1e5, 1e6 tokens; k = 10, 50
    python experiments/scaling.py --tokens 1e4,1e5 --k 10

Synthetic token sets: images of 32×32 tokens (1,024 each; 10, 100 and 1,000 images ≈ 1e4, 1e5,
1e6 tokens per layer), 64-dimensional vectors drawn around 20 random "semantic" centres. The
graph is one layer's intra-image kNN graph over all tokens (``knn_affinity`` with ``k_intra = k``,
then ``random_walk``: what ``KnnGraphBuilder`` does per layer); inter-image neighbours are a
per-batch search of fixed size, so they add a constant per token and are left out here. One
solver epoch is the fast solver's mini-batch step over every image (``K = 15`` + 5 guard vectors,
3 products with the operator, then the epoch's Rayleigh–Ritz).

Each measurement runs in a fresh subprocess; peak memory is the peak resident memory (sampled
every 5 ms) above what the process held just before the step. ``graph_mb`` is the memory of the
sparse graph itself: ``W``'s indices and values (``P`` shares ``W``'s indices, adding its values
and the degrees: ``layer_graph_mb``). One JSON line per (tokens, k, stage).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(n_tokens: int, k: int, threads: int) -> None:
    import torch

    from ldsc.bench import PeakRSS
    from ldsc.graphs import LayerGraph, knn_affinity, random_walk
    from ldsc.solvers.fast import FastSolver
    from ldsc.spectral import LayerOperator, flatten_channels

    torch.set_num_threads(threads)
    side, d = 32, 64
    n_images = max(1, round(n_tokens / side**2))
    N = n_images * side * side
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(20, d, generator=g)
    x = centers[torch.randint(0, 20, (N,), generator=g)] + 0.7 * torch.randn(N, d, generator=g)
    ids = torch.arange(n_images).repeat_interleave(side * side)
    random_walk(knn_affinity(x[:2048], ids[:2048], k, 0))  # warm-up: libraries' pages are not the graph's
    with PeakRSS() as mem:
        t = time.perf_counter()
        W = knn_affinity(x, ids, k_intra=k, k_inter=0, threshold=0.1)
        P, deg = random_walk(W)
        dt = time.perf_counter() - t
    graph = LayerGraph("synthetic", (side, side), n_images, W, P, deg, weight=1.0)
    w_mb = (W.indices().nbytes + W.values().nbytes) / 2**20
    layer_mb = w_mb + (P.values().nbytes + deg.nbytes) / 2**20
    print(json.dumps({"stage": "graph", "tokens": N, "k": k, "nnz": W._nnz(), "seconds": round(dt, 2),
                      "peak_mb": mem.peak_mb, "graph_mb": round(w_mb, 1), "layer_graph_mb": round(layer_mb, 1),
                      "peak_over_graph": round(mem.peak_mb / w_mb, 2),
                      "peak_over_layer_graph": round(mem.peak_mb / layer_mb, 2),
                      "us_per_token_k": round(dt / (N * k) * 1e6, 3)}), flush=True)
    del x
    solver = FastSolver(n_images=n_images, K=15, base_size=side)
    index = torch.arange(n_images)
    with PeakRSS() as mem:
        t = time.perf_counter()
        op = LayerOperator([graph], (side, side))
        solver._step_minibatch(op, flatten_channels(solver.table[index]), index)
        dt = time.perf_counter() - t
    table_mb = solver.table.nbytes / 2**20
    print(json.dumps({"stage": "solver_epoch", "tokens": N, "k": k, "seconds": round(dt, 2), "peak_mb": mem.peak_mb,
                      "table_mb": round(table_mb, 1), "us_per_token_k": round(dt / (N * k) * 1e6, 3)}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1e4,1e5,1e6")
    p.add_argument("--k", default="10,50")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=2, type=float, help=argparse.SUPPRESS)  # internal: one subprocess
    args = p.parse_args(argv)
    if args.one:
        return measure(int(args.one[0]), int(args.one[1]), args.threads)
    for n in (int(float(t)) for t in args.tokens.split(",")):
        for k in (int(v) for v in args.k.split(",")):
            res = subprocess.run([sys.executable, __file__, "--one", str(n), str(k), "--threads", str(args.threads)],
                                 capture_output=True, text=True)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode or not lines:
                print(json.dumps({"tokens": n, "k": k, "error": res.stderr.strip().splitlines()[-1:]}), flush=True)
            for ln in lines:
                print(ln, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
