"""Write a corpus of long "reviews" for memory measurements: 12 polarity sentences each.

The embedded Pang & Lee polarity corpus (``data/polarity/polarity.csv``) has
sentences of about 25 tokens. Joining 12 shuffled sentences of the same label
(seeded) gives 332 texts of about 300 MiniLM tokens, so with ``max-length =
256`` every batch is 256 tokens wide, as the long reviews of issue 12 were.

Usage: .venv/bin/python scripts/long_reviews.py OUT.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "polarity" / "polarity.csv"
PER_REVIEW = 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the CSV to write (label,text)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with SOURCE.open(newline="") as f:
        rows = [(int(r["label"]), r["text"]) for r in csv.DictReader(f)]
    rng = np.random.default_rng(args.seed)
    reviews = []
    for label in sorted({label for label, _ in rows}):
        texts = [text for lab, text in rows if lab == label]
        order = rng.permutation(len(texts))
        for start in range(0, len(texts) - PER_REVIEW + 1, PER_REVIEW):
            chunk = order[start : start + PER_REVIEW]
            reviews.append((label, " ".join(texts[i] for i in chunk)))
    reviews = [reviews[i] for i in rng.permutation(len(reviews))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "text"])
        writer.writerows(reviews)
    print(f"{len(reviews)} reviews of {PER_REVIEW} sentences written to {args.out}")


if __name__ == "__main__":
    main()
