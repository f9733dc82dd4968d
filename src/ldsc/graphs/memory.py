"""What a whole-data-set run needs in memory, estimated before it starts (a run that would not fit
is refused in one sentence by the data module)."""

from __future__ import annotations


def estimate_dataset_graph_bytes(n_images: int, layers: list[dict], k: int, draws: int = 1,
                                 dim: int | list[int | None] | None = None,
                                 heads: str = "concat", solver_columns: int = 20, base_size: int = 32,
                                 vectors: int = 1, shards: int = 1, chunk_elements: int = 2**24) -> dict:
    """Bytes a whole-data-set run needs at its peak, by part (``N`` tokens of a layer, ``k``
    neighbours per token, lists of ``N·k`` int32 ids + float32 similarities = ``8·N·k`` bytes).

    ``graphs``: every layer's ``S`` (``W`` has about ``1.3·N·k`` entries of 8 bytes: 1.5 is
    assumed) and its node order; ``build``: the largest of building one layer on top of the graphs
    built before it — while searching, its unit vectors (``vectors`` kinds of ``N × dim`` float32,
    and the keys once more in leaf order for the clustered search), its lists and the intra-image
    lists in int64; while relabelling, the lists (in place); while symmetrising, the lists,
    their transpose and ``W`` (an upper bound: the lists are freed once ``A`` is formed); ``solver``: six ``N_base × columns``
    float32 blocks of LOBPCG plus three of every layer size for its products (node order, product,
    token order: kept from one product to the next, :class:`~ldsc.graphs.dataset.Workspace`). ``peak`` = the larger
    of the build peak and graphs + solver, plus ``PROCESS_BYTES`` for the interpreter, torch and
    Lightning. Layers are built largest first. ``shards``: processes of a sharded run (each holds
    ``1/shards`` of the lists, graphs and solver blocks, but every layer's vectors whole).
    ``dim``: the width the vectors are searched at, one for all layers or one per layer (``None``:
    the layer's own). ``chunk_elements``: similarities the intra-image search holds at once (``graph.max_chunk_elements``;
    at least one query row against a whole image: ``T``), with their top-``k`` selection.
    """
    sizes, layer_rows = [], 0
    dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(layers)
    for info, reduced in zip(layers, dims):
        h, w = info["grid"]
        N = n_images * h * w
        layer_rows += N
        per_graph = info["heads"] if heads == "separate" else 1
        D = reduced or info.get("dim", 512) * (info["heads"] if heads == "concat" else 1)
        lists = 8 * N * k // shards
        g = int(1.5 * lists) + 16 * N // shards
        T = h * w  # the intra-image search's similarity block: whole images, or query rows of one
        block = max(1, chunk_elements // T) * T if T * T > chunk_elements else \
            min(n_images, max(1, chunk_elements // (T * T))) * T * T
        intra = 3 * 4 * block
        transient = max(N * D * 4 * (vectors + 1) + lists + 6 * N * k + intra, 2 * lists, 2 * lists + g)
        for _ in range(per_graph * draws):
            sizes.append((g, transient))
    sizes.sort(reverse=True)
    graphs, build, before = sum(g for g, _ in sizes), 0, 0
    for g, transient in sizes:
        build = max(build, before + transient)
        before += g
    solver = (6 * n_images * base_size * base_size // shards + 3 * layer_rows) * solver_columns * 4
    return {"graphs": graphs, "build": build, "solver": solver,
            "peak": PROCESS_BYTES + max(build, graphs + solver)}


#: resident memory of a run before any data (interpreter, torch, Lightning, Hydra), measured ~0.7 GB
PROCESS_BYTES = 2**30
