"""Print one markdown table comparing evaluated runs (``ldsc.evaluate.metrics_table``).

    python experiments/metrics_table.py RUN_DIR [RUN_DIR ...]        # or .../eval/metrics.json

Columns: mIoU and pixel accuracy (runs evaluated with labels), then "where" (position decoded
from / explaining the eigenvectors) and "what" (labels decoded from / explaining them), so a
``graph=qk`` and a ``graph=vv`` run, or the same preset across backbones, sit side by side.
"""

import sys

from ldsc.errors import LdscError
from ldsc.evaluate import metrics_table


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        print(metrics_table(args))
    except LdscError as err:
        print(f"metrics_table: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
