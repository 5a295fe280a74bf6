"""Write Alpaca-like SFT rows (macft.bench_data: median ~200 tokens, a tail to ~1000) as JSON lines.

    python scripts/alpaca_like_data.py data/alpaca_like.jsonl [--rows 2000] [--seed 0]

``macft bench sft --data alpaca-like`` generates the same rows in memory.
"""

import argparse
import json
from pathlib import Path

from macft.bench_data import alpaca_like_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = alpaca_like_rows(args.rows, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{args.out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
