"""Replace some entries' runs in a committed compare (results/toy-compare/) by those of a newer compare, and
rewrite its tables and plots: what a method change that moves only some rows needs, without the other
entries' hour of runs.

    .venv/bin/python -m minipeft.compare --methods adalora,spiel --seeds 0,1,2 --jobs 1 --out /tmp/cmp-as
    .venv/bin/python scripts/replace_compare_entries.py --into results/toy-compare --from /tmp/cmp-as/compare.json

Both compares must have the same settings (steps, batch, seeds, test problems, base, task): refused otherwise.
The base model's row and every other entry's runs are kept as they are; the replaced entries' rows are
aggregated again from their new runs (minipeft.compare.aggregate), and compare.md, claims.md, compare.json and
the plots are rewritten (minipeft.compare.write_outputs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipeft.compare import aggregate, write_outputs  # noqa: E402

SAME = ("steps", "batch_size", "seeds", "eval_limit", "limit", "max_new_tokens", "base", "data", "task")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--into", type=Path, required=True, help="the committed compare folder (compare.json inside)")
    p.add_argument("--from", dest="source", type=Path, required=True, help="the newer compare's compare.json")
    args = p.parse_args(argv)
    old, new = (json.loads(path.read_text()) for path in (args.into / "compare.json", args.source))
    differ = [k for k in SAME if old["settings"].get(k) != new["settings"].get(k)]
    if differ:
        print(f"error: {args.source}: settings {differ} differ from {args.into / 'compare.json'}'s", file=sys.stderr)
        return 1
    labels = {r["label"] for r in new["runs"]}
    order = [row["method"] for row in old["rows"]]
    missing = labels - set(order)
    if missing:
        print(f"error: {args.source}: entries {sorted(missing)} are not in {args.into}", file=sys.stderr)
        return 1
    runs = [r for r in old["runs"] if r["label"] not in labels] + new["runs"]
    fresh = {row["method"]: row for row in aggregate([r for r in runs if r["label"] in labels])}
    rows = [fresh.get(row["method"], row) for row in old["rows"]]  # the base row and the order kept
    write_outputs(rows, sorted(runs, key=lambda r: (order.index(r["label"]), r["seed"])), args.into, old["settings"])
    print(f"replaced {sorted(labels)} in {args.into}: " + "; ".join(
        f"{m} {fresh[m]['test_bpt']:.4f} bits/token" for m in sorted(labels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
