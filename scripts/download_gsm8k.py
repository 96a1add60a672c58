"""Download GSM8K (train.jsonl, test.jsonl) from the official repository into data/gsm8k/.

Source: https://github.com/openai/grade-school-math, folder grade_school_math/data.
Licence: MIT, Copyright (c) 2021 OpenAI. Paper: Cobbe et al., "Training Verifiers to Solve Math
Word Problems", arXiv:2110.14168.

Each download is streamed to disk in chunks (at most MAX_BYTES: a larger body is an error, not a
full memory) inside a hidden temp folder beside --out; both files are checked there (expected line
count; every line a JSON object with string `question` and `answer`), and only then is the temp
folder renamed into place as --out, the pair together (`publish`): the old folder is kept until the
new one is complete, and any other file in it is carried over. A full disk or a bad file leaves
--out as it was. Standard library only, so it runs before `make install`.

    .venv/bin/python scripts/download_gsm8k.py                      # what `make data` runs
    .venv/bin/python scripts/download_gsm8k.py --out /tmp/gsm8k --source file:///path/to/copy
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
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
MAX_BYTES = 64 << 20  # per file: the official ones are 4.2 MB (train) and 0.7 MB (test)
CHUNK = 1 << 20


def source_url(source: str, split: str) -> str:
    """`{source}/{split}.jsonl`; a source without a URL scheme is a local folder."""
    if "://" not in source:
        source = Path(source).resolve().as_uri()
    return f"{source.rstrip('/')}/{split}.jsonl"


def fetch(url: str, timeout: float = 60.0, dest: Path | None = None, max_bytes: int = MAX_BYTES,
          limit_name: str = f"MAX_BYTES in {Path(__file__).name}") -> Path:
    """Stream `url` into the file `dest` (default: a new temp file in $TMPDIR, the caller deletes it) in
    chunks of 1 MiB; a body larger than `max_bytes` is an error naming the url and the limit (and `dest`
    is removed). `timeout` is per read."""
    if dest is None:
        fd, name = tempfile.mkstemp(prefix="minipeft-download-")
        os.close(fd)
        dest = Path(name)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            size = 0
            while block := response.read(CHUNK):
                size += len(block)
                if size > max_bytes:
                    raise ValueError(f"{url}: larger than the limit of {max_bytes:,} bytes ({limit_name}); "
                                     "not the expected file?")
                f.write(block)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def staging_folder(out: Path) -> Path:
    """A new hidden temp folder beside `out` (same file system, so `publish` is a rename)."""
    out = out.resolve()  # a symlinked --out: beside the folder it points to
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o777 & ~umask)  # mkdtemp makes it owner-only; it becomes --out, as mkdir would make it
    return staged


def publish(staged: Path, out: Path) -> None:
    """Put the complete folder `staged` in place as `out`. An existing `out` stays whole until then: the
    files in it that `staged` does not replace (a user's own) are first linked (or copied) into `staged`,
    then `out` is renamed aside, `staged` renamed to `out`, and only then the old folder deleted. A
    failure before the renames (a full disk while copying) leaves `out` untouched."""
    out = out.resolve()  # a symlinked --out: replace the folder it points to, keep the link
    if out.exists():
        carry_over(out, staged)
        aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        old = aside / out.name
        try:
            os.replace(out, old)
            try:
                os.replace(staged, out)
            except BaseException:
                os.replace(old, out)
                raise
        except BaseException:
            if not old.exists():  # the old folder is back in place (else it stays in `aside`, whole)
                aside.rmdir()
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staged, out)


def carry_over(old: Path, new: Path) -> None:
    """Link into `new` every file of `old` that `new` lacks (same relative path); copy where links fail."""
    for root, dirs, files in os.walk(old):
        rel = Path(root).relative_to(old)
        for name in dirs + files:
            src, dst = Path(root) / name, new / rel / name
            if dst.exists() or dst.is_symlink():
                continue
            if src.is_symlink():
                dst.symlink_to(os.readlink(src))
            elif src.is_dir():
                dst.mkdir()
            else:
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/gsm8k", help="target folder (default: data/gsm8k)")
    parser.add_argument("--source", default=SOURCE,
                        help="URL prefix or local folder holding train.jsonl and test.jsonl")
    args = parser.parse_args(argv)
    print(f"GSM8K from {args.source}\n  {LICENCE}")
    out, split = Path(args.out), "the output folder"
    try:
        staged = staging_folder(out)
    except OSError as e:
        print(f"error: {out}: {e}", file=sys.stderr)
        return 1
    try:
        for split in LINES:                    # fetch and check both before publishing either
            url = source_url(args.source, split)
            path = fetch(url, dest=staged / f"{split}.jsonl")
            check(path.read_bytes(), split, url)  # at most MAX_BYTES
            os.chmod(path, 0o644)
        digests = {split: sha256_of(staged / f"{split}.jsonl") for split in LINES}
        split = "the output folder"
        publish(staged, out)
    except (OSError, ValueError, http.client.HTTPException) as e:  # HTTPException: e.g. a cut-off transfer
        print(f"error: {split}: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already once published
    for split, digest in digests.items():
        note = "matches the official file" if digest == SHA256[split] else "differs from the official file"
        print(f"  wrote {out / f'{split}.jsonl'}: {LINES[split]} lines, sha256 {digest[:16]}... ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
