"""Download GSM8K (train.jsonl, test.jsonl) from the official repository into data/gsm8k/.

Source: https://github.com/openai/grade-school-math, folder grade_school_math/data.
Licence: MIT, Copyright (c) 2021 OpenAI. Paper: Cobbe et al., "Training Verifiers to Solve Math
Word Problems", arXiv:2110.14168.

Both files are checked before either is written (expected line count; every line a JSON object with
string `question` and `answer`) and written atomically (temp file + rename), so data/gsm8k/ never
holds a partial download. Standard library only, so it runs before `make install`.

    python scripts/download_gsm8k.py                      # what `make data` runs
    python scripts/download_gsm8k.py --out /tmp/gsm8k --source file:///path/to/copy
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

SOURCE = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
LINES = {"train": 7473, "test": 1319}
# sha256 of the official files; a mismatch is reported, not fatal (line counts are the check)
SHA256 = {"train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
          "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"}
LICENCE = "MIT licence, Copyright (c) 2021 OpenAI (github.com/openai/grade-school-math)"


def source_url(source: str, split: str) -> str:
    """`{source}/{split}.jsonl`; a source without a URL scheme is a local folder."""
    if "://" not in source:
        source = Path(source).resolve().as_uri()
    return f"{source.rstrip('/')}/{split}.jsonl"


def fetch(url: str, timeout: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def check(data: bytes, split: str, url: str) -> None:
    """Raise ValueError unless `data` holds exactly LINES[split] GSM8K JSON lines."""
    lines = data.decode("utf-8").rstrip("\n").split("\n")
    if len(lines) != LINES[split]:
        raise ValueError(f"{url}: expected {LINES[split]} lines, got {len(lines)}")
    for n, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{url}:{n}: invalid JSON ({e.msg})") from None
        if not (isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("question", "answer"))):
            raise ValueError(f"{url}:{n}: expected an object with string 'question' and 'answer'")


def write_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)                   # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/gsm8k", help="target folder (default: data/gsm8k)")
    parser.add_argument("--source", default=SOURCE,
                        help="URL prefix or local folder holding train.jsonl and test.jsonl")
    args = parser.parse_args(argv)
    print(f"GSM8K from {args.source}\n  {LICENCE}")
    files = {}
    for split in LINES:                        # fetch and check both before writing either
        url = source_url(args.source, split)
        try:
            files[split] = fetch(url)
            check(files[split], split, url)
        except (OSError, ValueError, http.client.HTTPException) as e:  # HTTPException: e.g. a cut-off transfer
            print(f"error: {split}: {e}", file=sys.stderr)
            return 1
    for split, data in files.items():
        path = Path(args.out) / f"{split}.jsonl"
        write_atomic(data, path)
        digest = hashlib.sha256(data).hexdigest()
        note = "matches the official file" if digest == SHA256[split] else "differs from the official file"
        print(f"  wrote {path}: {LINES[split]} lines, sha256 {digest[:16]}... ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
