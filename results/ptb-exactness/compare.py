"""Dense against factored Taylor on real PTB, epoch by epoch: prints a Markdown table.

python results/ptb-exactness/compare.py > results/ptb-exactness/compare.md
"""

import csv
import json
import math
from pathlib import Path

HERE = Path(__file__).parent
COLUMNS = ("valid_perplexity", "test_perplexity", "valid_top10_error")


def steps_per_epoch(run: Path) -> int:
    """Truncated-BPTT steps in one epoch of ``--train-limit`` tokens."""
    settings = json.loads((run / "config.json").read_text())["settings"]
    per_stream = settings["train_limit"] // settings["batch_size"]
    return math.ceil((per_stream - 1) / settings["bptt"])


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


print("| dtype | epoch | steps | dense valid ppl | factored valid ppl | largest rel. difference |")
print("|---|---:|---:|---:|---:|---:|")
for dtype in ("float64", "float32"):
    dense, factored = rows(HERE / dtype / "taylor"), rows(HERE / dtype / "taylor-factored")
    steps = steps_per_epoch(HERE / dtype / "taylor")
    for a, b in zip(dense, factored, strict=True):
        worst = max(abs(float(a[c]) - float(b[c])) / abs(float(a[c])) for c in COLUMNS)
        print(
            f"| {dtype} | {a['epoch']} | {steps * int(a['epoch'])} "
            f"| {float(a['valid_perplexity']):.10g} | {float(b['valid_perplexity']):.10g} "
            f"| {worst:.1e} |"
        )
