"""What reducing the search vectors (``graph.dim``) does to the eigenvectors, on real-width features.

    python experiments/reduction_alignment.py --root data/crops10k --limit 300 --search cluster --dims 32 64 96 128
    python experiments/reduction_alignment.py --root ../shared/data/coco_val2017_first100 --search exact

The pixel backbone with ``--n-features`` 384 gives 768-dimensional vectors (ViT-B's width). For the
first ``--limit`` images, :class:`ldsc.LDSC` (``graph="vv"``, K = 15, the default settings otherwise)
is fitted once at full width (``dim=None``) and once per ``--dims`` (PCA, as ``graph.dim=auto``
reduces a layer that does not fit ``graph.max_vectors_gb``); one JSON line per fit: seconds of the
graphs and of the solve, and the alignment (mean cos² of the principal angles) of its eigenvectors
with the full-width fit's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--n-features", type=int, default=384)
    ap.add_argument("--search", default="cluster", help="exact | cluster | auto")
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 64, 96, 128])
    ap.add_argument("--K", type=int, default=15)
    args = ap.parse_args(argv)

    import torch

    from ldsc import LDSC
    from ldsc.features.backbones.pixel import PixelBackbone
    from ldsc.features.images import IMAGE_EXTENSIONS, image_tensor
    from ldsc.spectral import subspace_alignment

    files = sorted(p for p in Path(args.root).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.limit]
    bb = PixelBackbone(n_features=args.n_features)
    bb.set_base_size(32)
    layers = []
    for s in range(0, len(files), 50):
        feats = bb(torch.stack([image_tensor(f, bb.input_size) for f in files[s:s + 50]]))
        layers.append([f.v[:, 0].half() for f in feats])
    layers = [torch.cat([b[i] for b in layers]).float() for i in range(len(layers[0]))]
    width = layers[0].shape[-1]
    common = dict(K=args.K, graph="vv", search=args.search, progress=False)
    t = time.perf_counter()
    ref = LDSC(dim=None, **common).fit(layers)
    print(json.dumps({"images": len(files), "width": width, "search": args.search, "dim": None,
                      "seconds": round(time.perf_counter() - t, 1), **ref.timings_}), flush=True)
    for d in args.dims:
        t = time.perf_counter()
        model = LDSC(dim=d, **common).fit(layers)
        print(json.dumps({"images": len(files), "width": width, "search": args.search, "dim": d,
                          "seconds": round(time.perf_counter() - t, 1), **model.timings_,
                          "alignment_with_full_width": round(subspace_alignment(model.eigenvectors_, ref.eigenvectors_), 5)}),
              flush=True)


if __name__ == "__main__":
    main()
