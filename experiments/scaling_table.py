"""Markdown tables from the JSON lines of `experiments/scaling.py` (one line per run).

    python experiments/scaling_table.py notes/measurements/scaling_cpu.jsonl --last 3

Prints the per-run table (seconds and peak MB per stage) and the graph-stage time per token of
every layer (intra-image search, inter-image search, symmetrisation), sorted by tokens.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl")
    ap.add_argument("--last", type=int, default=0, help="only the last N lines")
    args = ap.parse_args()
    runs = [json.loads(line) for line in open(args.jsonl) if line.strip()]
    runs = [r for r in runs if "peak_rss_mb" in r]  # (early lines lack the per-stage figures)
    runs = runs[-args.last:] if args.last else runs
    print("| images | base nodes | features s | graphs s (MB) | solve s (MB) | export s | whole process s | peak MB | alignment with exact |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        st = r["stages"]
        print(f"| {r['images']:,} | {r['tokens_base']:,} | {st['features']['seconds']:.1f} | "
              f"{st['graphs']['seconds']:.1f} ({st['graphs']['peak_rss_mb']:.0f}) | "
              f"{st['solve']['seconds']:.1f} ({st['solve']['peak_rss_mb']:.0f}) | {st['export']['seconds']:.1f} | "
              f"{r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | {r.get('alignment_with_exact', '—')} |")
    print()
    print("| layer | tokens | search | intra µs/token | inter µs/token | symmetrise µs/token | total µs/token |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    rows = []
    for r in runs:
        for layer in r["stages"]["graphs"]["layers"]:
            t = layer["tokens"]
            us = [layer[k] / t * 1e6 for k in ("intra_s", "inter_s", "symmetrize_s")]
            rows.append((t, f"| {layer['name']} of {r['images']:,} images | {t:,} | {layer['search']} | "
                            + " | ".join(f"{u:.1f}" for u in us) + f" | {sum(us):.1f} |"))
    for _, line in sorted(rows):
        print(line)


if __name__ == "__main__":
    main()
