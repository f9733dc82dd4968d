"""Neighbour-search settings vs time, recall and eigenvector alignment on a real folder.

    python experiments/search_tradeoff.py --root ../shared/data/coco_val2017_first100 \
        --reference outputs/ref101 --settings "search=cluster" "search=cluster,nprobe=32" "search=ivf"

Builds the pixel backbone's feature store for the folder (reused when present), then for each
setting (comma-separated ``graph.*`` overrides) the whole-data-set graphs and their top-K
eigenvectors (LOBPCG to tol 1e-4); prints one JSON line per setting: graph seconds by stage,
recall of the inter-image neighbours of the largest layer against exact search, and the
alignment with ``--reference`` (a run folder of ``solver=exact graph.search=exact``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--reference", help="run folder whose eigvecs.pt is the exact reference")
    ap.add_argument("--graph", default="vv")
    ap.add_argument("--K", type=int, default=15)
    ap.add_argument("--recall", action="store_true", help="also measure recall against exact search (slow)")
    ap.add_argument("--settings", nargs="+", default=["search=cluster"])
    ap.add_argument("--override", nargs="*", default=[], help="extra overrides (e.g. backbone.n_features=32 store.dir=...)")
    args = ap.parse_args()

    from ldsc.bench import compose
    from ldsc.graphs.search import inter_image_knn, knn_recall
    from ldsc.run import build_datamodule
    from ldsc.spectral import LayerOperator, lobpcg_top, subspace_alignment, unflatten_channels

    ref = torch.load(f"{args.reference}/eigvecs.pt", weights_only=True)["eigvecs"] if args.reference else None
    exact_cache = {}
    for setting in args.settings:
        over = [f"graph.{kv}" for kv in setting.split(",") if kv]
        cfg = compose(["data=folder", f"data.root={args.root}", f"graph={args.graph}", f"K={args.K}", *args.override, *over])
        dm, base = build_datamodule(cfg)
        store = dm.feature_store()
        builder = dm.graph_builder
        t = time.perf_counter()
        graphs = builder.dataset_graphs(store, base, progress=False)
        graph_s = time.perf_counter() - t
        op = LayerOperator(graphs, (base, base))
        start = torch.randn(op.size, args.K + 5, generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        theta, X, it = lobpcg_top(op, start, 300, tol=1e-4)
        solve_s = time.perf_counter() - t
        line = {"setting": setting, "graph_s": round(graph_s, 2), **{k: round(v, 2) for k, v in builder.timings.items()},
                "solve_s": round(solve_s, 2), "iterations": it, "nnz": sum(g.nnz for g in graphs)}
        if ref is not None:
            Z = unflatten_channels(X[:, : args.K], store.n_images, base, base)
            line["alignment"] = round(subspace_alignment(Z, ref), 5)
        if args.recall and builder.k_inter:
            (x, y), = builder.layer_vectors(store, 0, 0)
            T = store.layers[0]["grid"][0] * store.layers[0]["grid"][1]
            key = (setting.split("search=")[0], builder.dim)
            if key not in exact_cache:
                exact_cache[key] = inter_image_knn(x, y, T, builder.k_inter, "exact")[0]
            method = builder.search_method(x.shape[0])
            approx = inter_image_knn(x, y, T, builder.k_inter, method, nlist=builder.nlist, nprobe=builder.nprobe,
                                     list_size=builder.list_size, hnsw_m=builder.hnsw_m, ef_search=builder.ef_search,
                                     ef_construction=builder.ef_construction)[0]
            line["recall"] = round(knn_recall(approx, exact_cache[key]), 4)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
