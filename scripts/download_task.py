"""Download MMLU, ARC-Challenge or databricks-dolly-15k from the official source, check it, write it atomically.

    .venv/bin/python scripts/download_task.py --task mmlu            # -> data/mmlu/{auxiliary_train,dev,val,test}/*.csv
    .venv/bin/python scripts/download_task.py --task arc_challenge   # -> data/arc_challenge/ARC-Challenge-{Train,Dev,Test}.jsonl
    .venv/bin/python scripts/download_task.py --task dolly           # -> data/dolly/databricks-dolly-15k.jsonl
    .venv/bin/python scripts/download_task.py --task mmlu --source /mirror/data.tar   # a mirror URL or a local copy

The download is streamed to a temp file in $TMPDIR (at most MAX_BYTES; never held in memory), and the
task's files are extracted from it into a hidden temp folder beside --out. Every file is parsed there
with the reader finetune uses (minipeft/tasks.py: a malformed row is an error naming its file and line)
and the row counts must equal the official ones; only then is the temp folder renamed into place as
--out, all files together (download_gsm8k.publish: the old folder is kept until the new one is
complete; other files in it are carried over). A failed check or a full disk leaves --out as it was.
`make data TASK=...` runs this script (GSM8K has its own, scripts/download_gsm8k.py). Licences:
data/README.md.
"""
from __future__ import annotations

import argparse
import http.client
import io
import re
import shutil
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import download_gsm8k  # noqa: E402  (the same streamed download and folder swap as GSM8K)
from download_gsm8k import CHUNK, publish, sha256_of, staging_folder  # noqa: E402
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
MAX_BYTES = 2 << 30  # per download and per extracted file: the largest, ARC's zip, is about 680 MB
_MMLU_MEMBER = re.compile(r"(?:^|/)data/(auxiliary_train|dev|val|test)/([^/.][^/]*\.csv)$")  # not ._ (macOS)
_ARC_MEMBER = re.compile(r"(?:^|/)ARC-Challenge/(ARC-Challenge-(?:Train|Dev|Test)\.jsonl)$")


def fetch(url: str, timeout: float) -> Path:
    """The body of `url` streamed into a temp file in $TMPDIR (at most MAX_BYTES); the caller deletes it."""
    return download_gsm8k.fetch(url, timeout, max_bytes=MAX_BYTES, limit_name=f"MAX_BYTES in {Path(__file__).name}")


def extract(task: str, blob: bytes | Path, where: str, into: Path) -> list[str]:
    """Write the files the task needs, out of the downloaded archive or file (its bytes, or the file),
    under `into`, one chunk at a time; returns their paths under --out."""
    files = []
    with (io.BytesIO(blob) if isinstance(blob, bytes) else open(blob, "rb")) as source:
        if task == "mmlu":
            with tarfile.open(fileobj=source) as tar:
                for member in tar:
                    m = _MMLU_MEMBER.search(member.name)
                    if m and member.isfile():
                        files.append(_write(tar.extractfile(member), into, f"{m.group(1)}/{m.group(2)}", where))
        elif task == "arc_challenge":
            with zipfile.ZipFile(source) as z:
                for name in z.namelist():
                    m = _ARC_MEMBER.search(name)
                    if m:
                        with z.open(name) as member:
                            files.append(_write(member, into, m.group(1), where))
        else:
            files.append(_write(source, into, DOLLY_FILE, where))
    if not files:
        raise ValueError(f"{where}: none of the {task} files in the expected layout")
    return files


def _write(src, into: Path, rel: str, where: str) -> str:
    """Copy the stream `src` to into/rel in chunks, refusing more than MAX_BYTES."""
    (into / rel).parent.mkdir(parents=True, exist_ok=True)
    with open(into / rel, "wb") as f:
        size = 0
        while block := src.read(CHUNK):
            size += len(block)
            if size > MAX_BYTES:
                raise ValueError(f"{where} member {rel}: larger than the limit of {MAX_BYTES:,} bytes (MAX_BYTES in "
                                 f"{Path(__file__).name})")
            f.write(block)
    return rel


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


def install(task: str, blob: bytes | Path, out: Path, where: str,
            expected: dict[str, int] | None = None) -> dict[str, int]:
    """Extract into a hidden folder beside `out`, check every file there, then publish the folder as `out`:
    the files of an earlier download are replaced together, never one beside an old other."""
    staged = staging_folder(out)  # a failed check leaves no `out`, and an old `out` as it was
    try:
        extract(task, blob, where, staged)
        try:
            counts = check(task, staged, ROWS[task] if expected is None else expected)
        except ValueError as e:  # name the file inside the download, not the staging folder
            raise ValueError(str(e).replace(f"{staged}/", f"{where} member ")) from None
        publish(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already once published
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
        archive = fetch(url, timeout=600)  # the timeout is per read; streamed to a temp file
        try:
            print(f"  downloaded {archive.stat().st_size:,} bytes, sha256 {sha256_of(archive)}")
            counts = install(args.task, archive, out, url)
        finally:
            archive.unlink(missing_ok=True)
    except (OSError, ValueError, http.client.HTTPException, tarfile.TarError, zipfile.BadZipFile, zlib.error) as e:
        print(f"error: {args.task}: {e}", file=sys.stderr)  # HTTPException: e.g. a transfer cut off midway
        return 1
    print("  wrote " + ", ".join(f"{k}: {v:,} rows" for k, v in counts.items()) + f" into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
