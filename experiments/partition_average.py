"""How close can a mini-batch solver get? The exact eigenspace of the average of the graphs of
several random partitions into batches, compared with the whole-data-set eigenspace (DESIGN §4).

    python experiments/partition_average.py                                 # the 101 COCO images
    python experiments/partition_average.py --root DIR --partitions 6 --batch 40

A mini-batch solver sees one partition's block-diagonal graph per epoch; the best it can do over
``P`` epochs is the eigenspace of their average. One line per ``P``: that eigenspace's subspace
alignment with the exact eigenspace of the whole data set's graph (intra + inter neighbours over
all images), with the app's graph settings (``experiment=dataset``: 32×32, 25 + 25 neighbours).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(SHARED / "coco_val2017_first100"))
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--K", type=int, default=15)
    p.add_argument("--override", nargs="*", default=["backbone.divisors=[1,2]"], help="extra Hydra overrides")
    args = p.parse_args(argv)

    from ldsc.bench import compose
    from ldsc.data import ImageFiles
    from ldsc.run import build_datamodule
    from ldsc.spectral import exact_eigenvectors, exact_operator, subspace_alignment, top_eigenvectors, unflatten_channels

    cfg = compose(["experiment=dataset", f"data.root={args.root}", f"K={args.K}", *args.override])
    dm, base = build_datamodule(cfg)
    files = dm.prepare_files()
    n = len(files)
    t = time.perf_counter()
    _, ref = exact_eigenvectors([g.to("cpu") for g in dm.whole_dataset_graphs()], (base, base), args.K)
    dm.release_whole_dataset_graphs()
    print(json.dumps({"images": n, "base": base, "K": args.K, "reference_s": round(time.perf_counter() - t, 1)}),
          flush=True)
    data = ImageFiles(files, dm.backbone.input_size)
    images = torch.stack([data[i]["image"] for i in range(n)])
    total = None
    for part in range(args.partitions):
        t = time.perf_counter()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(100 + part))
        for s in range(0, n, args.batch):
            idx = perm[s:s + args.batch]
            graphs = [g.to("cpu") for g in dm.graphs_for(images[idx], idx, part)]
            term = exact_operator(graphs, (base, base), image_index=idx, n_images=n)
            total = term if total is None else total + term
        _, vecs = top_eigenvectors(total / (part + 1), args.K)
        Z = unflatten_channels(torch.from_numpy(vecs.copy()), n, base, base)
        print(json.dumps({"partitions": part + 1, "alignment": round(subspace_alignment(Z, ref), 4),
                          "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
