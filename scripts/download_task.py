"""Download MMLU, ARC-Challenge or databricks-dolly-15k from the official source, check it, write it atomically.

    python scripts/download_task.py --task mmlu            # -> data/mmlu/{auxiliary_train,dev,val,test}/*.csv
    python scripts/download_task.py --task arc_challenge   # -> data/arc_challenge/ARC-Challenge-{Train,Dev,Test}.jsonl
    python scripts/download_task.py --task dolly           # -> data/dolly/databricks-dolly-15k.jsonl
    python scripts/download_task.py --task mmlu --source /mirror/data.tar   # a mirror URL or a local copy

Every file is parsed with the reader finetune uses (minipeft/tasks.py: a malformed row is an error naming
its file and line) and the row counts must equal the official ones, before anything is written into
--out; each file is then written as a temp file and renamed. `make data TASK=...` runs this script
(GSM8K has its own, scripts/download_gsm8k.py). Licences: data/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
from download_gsm8k import fetch, write_atomic  # noqa: E402  (the same fetch and atomic write as GSM8K)
from minipeft.tasks import DOLLY_FILE, load_arc_jsonl, load_dolly_jsonl, load_mmlu_csv  # noqa: E402

SOURCES = {
    "mmlu": "https://people.eecs.berkeley.edu/~hendrycks/data.tar",
    "arc_challenge": "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip",
    "dolly": "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl",
}
# Official row counts: MMLU per folder (57 subjects; 5 dev questions each), ARC-Challenge and dolly per file.
ROWS = {
    "mmlu": {"auxiliary_train": 99842, "dev": 285, "val": 1531, "test": 14042},
    "arc_challenge": {"ARC-Challenge-Train.jsonl": 1119, "ARC-Challenge-Dev.jsonl": 299, "ARC-Challenge-Test.jsonl": 1172},
    "dolly": {DOLLY_FILE: 15011},
}
LICENCES = {
    "mmlu": "MMLU (Hendrycks et al., arXiv:2009.03300), MIT licence, github.com/hendrycks/test",
    "arc_challenge": "ARC (Clark et al., arXiv:1803.05457), CC BY-SA 4.0, allenai.org/data/arc",
    "dolly": "databricks-dolly-15k, CC BY-SA 3.0, huggingface.co/datasets/databricks/databricks-dolly-15k",
}
_MMLU_MEMBER = re.compile(r"(?:^|/)data/(auxiliary_train|dev|val|test)/([^/.][^/]*\.csv)$")  # not ._ (macOS)
_ARC_MEMBER = re.compile(r"(?:^|/)ARC-Challenge/(ARC-Challenge-(?:Train|Dev|Test)\.jsonl)$")


def extract(task: str, blob: bytes, where: str) -> dict[str, bytes]:
    """{path under --out: bytes} of the files the task needs, out of the downloaded archive or file."""
    files = {}
    if task == "mmlu":
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            for member in tar.getmembers():
                m = _MMLU_MEMBER.search(member.name)
                if m and member.isfile():
                    files[f"{m.group(1)}/{m.group(2)}"] = tar.extractfile(member).read()
    elif task == "arc_challenge":
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for name in z.namelist():
                m = _ARC_MEMBER.search(name)
                if m:
                    files[m.group(1)] = z.read(name)
    else:
        files[DOLLY_FILE] = blob
    if not files:
        raise ValueError(f"{where}: none of the {task} files in the expected layout")
    return files


def check(task: str, staged: Path, expected: dict[str, int]) -> dict[str, int]:
    """Parse every staged file with finetune's reader and compare the row counts with `expected`."""
    counts: dict[str, int] = {}
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        rel = path.relative_to(staged)
        if task == "mmlu":
            key, n = rel.parts[0], len(load_mmlu_csv(path))
        else:
            key, n = rel.name, len((load_arc_jsonl if task == "arc_challenge" else load_dolly_jsonl)(path))
        counts[key] = counts.get(key, 0) + n
    for key, want in expected.items():
        if counts.get(key, 0) != want:
            raise ValueError(f"{task} {key}: expected {want} rows, got {counts.get(key, 0)}")
    return counts


def install(task: str, blob: bytes, out: Path, where: str, expected: dict[str, int] | None = None) -> dict[str, int]:
    """Extract, stage in a hidden folder next to the files, check, then move each file into `out` atomically."""
    files = extract(task, blob, where)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))  # a failed check leaves no `out`
    try:
        for rel, data in files.items():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_bytes(data)
        try:
            counts = check(task, staged, ROWS[task] if expected is None else expected)
        except ValueError as e:  # name the file inside the download, not the staging folder
            raise ValueError(str(e).replace(f"{staged}/", f"{where} member ")) from None
        for rel, data in files.items():
            write_atomic(data, out / rel)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=tuple(SOURCES))
    parser.add_argument("--out", help="target folder (default: data/<task>)")
    parser.add_argument("--source", help="URL or local file of the official archive/file (default: the official URL)")
    args = parser.parse_args(argv)
    source = args.source or SOURCES[args.task]
    url = source if "://" in source else Path(source).resolve().as_uri()
    out = Path(args.out or f"data/{args.task}")
    print(f"{args.task} from {url}\n  {LICENCES[args.task]}")
    try:
        blob = fetch(url, timeout=600)  # the timeout is per read; the whole file is held in memory (ARC: ~680 MB)
        print(f"  downloaded {len(blob):,} bytes, sha256 {hashlib.sha256(blob).hexdigest()}")
        counts = install(args.task, blob, out, url)
    except (OSError, ValueError, http.client.HTTPException, tarfile.TarError, zipfile.BadZipFile, zlib.error) as e:
        print(f"error: {args.task}: {e}", file=sys.stderr)  # HTTPException: e.g. a transfer cut off midway
        return 1
    print("  wrote " + ", ".join(f"{k}: {v:,} rows" for k, v in counts.items()) + f" into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
