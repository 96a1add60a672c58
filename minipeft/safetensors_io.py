"""A small reader and writer for the safetensors format, written here so minipeft needs no extra package;
and the guarded file reads and atomic writes every minipeft file goes through.

Three rules hold for every file minipeft reads or writes:
  * reads go through `regular_file` / `regular` (a FIFO or a device would hang the reader);
  * a tensor or JSON number read or written is finite (`check_tensor`, `cast_finite`, `read_json`),
    checked after any cast, and a weight is floating point;
  * a write never destroys what it replaces before the new data is complete: one file through
    `atomic_write` (temp file + rename), a set of files that belong together (a checkpoint, an adapter)
    through `staged_files` (all written under temp names, then renamed into place, then the stale ones
    of an earlier save removed).

The format (https://github.com/huggingface/safetensors, "Format" section) is:

    [8 bytes: little-endian u64 N][N bytes: JSON header][raw tensor bytes]

The header maps each tensor name to {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]},
offsets counted from the first byte after the header; an optional "__metadata__" holds strings.

Reading memory-maps the file copy-on-write, so tensors are views of the page cache: nothing is
copied into RAM until a tensor is converted (another dtype or device) or written to. That is what
keeps loading a 1B model in bf16 close to 1x its weight bytes of memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
import stat
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit too


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return (header dict without __metadata__, byte offset where tensor data starts)."""
    path = regular(Path(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {len(first)} bytes, need an 8-byte header length)")
        (n,) = struct.unpack("<Q", first)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path}: corrupt safetensors header: header length {n} bytes "
                             f"but the file has {size} bytes")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise ValueError(f"{path}: corrupt safetensors header: it must start with '{{'")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header: invalid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header: expected a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    for name, info in header.items():
        _check_entry(path, name, info, data_len)
    _check_layout(path, header, data_len)
    return header, data_start


def _check_layout(path: Path, header: dict, data_len: int) -> None:
    """As the reference reader validates: the tensors, in offset order, tile the data section exactly,
    from byte 0 to its end, with no gap and no overlap. Overlapping tensors would load as views of one
    storage (two layers sharing a weight); a gap or a short end means a shifted header length."""
    at = 0
    for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes"
            raise ValueError(f"{path}: tensor '{name}' starts at byte {begin} of the data section and {what} "
                             f"(the tensors must be contiguous from byte 0, in order)")
        at = end
    if at != data_len:
        raise ValueError(f"{path}: the tensors cover {at} bytes but the data section has {data_len} "
                         "(corrupt header length or trailing bytes)")


def _check_entry(path: Path, name: str, info: dict, data_len: int) -> None:
    try:
        dtype, shape, (begin, end) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*shape, begin, end]):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: corrupt safetensors header entry for tensor '{name}': {info!r}") from None
    numel = 1
    for s in shape:
        numel *= s
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if end - begin != expected or not 0 <= begin <= end <= data_len:
        raise ValueError(f"{path}: tensor '{name}' has data_offsets [{begin}, {end}] for shape {shape} "
                         f"{info['dtype']} ({expected} bytes); the data section has {data_len} bytes "
                         "(truncated or corrupt file?)")


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Memory-map a .safetensors file and return {name: tensor} views into it (no copy)."""
    path = Path(path)
    header, data_start = read_header(path)
    if not header:
        return {}
    with open(path, "rb") as f:
        # ACCESS_COPY: private copy-on-write pages, so tensors are writable without touching the file
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        if end == begin:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
        out[name] = flat.view(dtype).reshape(info["shape"])
    return out


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path` in safetensors format, atomically (temp file + rename)."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset, cpu = 0, {}
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"save_file: tensor '{name}' has unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        cpu[name], offset = t, offset + nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in sorted(cpu):
            if cpu[name].numel():
                f.write(cpu[name].reshape(-1).view(torch.uint8).numpy().data)


class atomic_write:
    """`with atomic_write(path) as f:` writes to a temp file beside `path`, renamed over it on success.

    A crash or exception mid-write leaves the previous file untouched (os.replace is atomic on POSIX).
    mkstemp creates the temp file 0600; before the rename it gets the mode an ordinary open() would
    give (0o666 & ~umask), so results on a shared machine stay readable by the group as usual.
    """

    def __init__(self, path: str | Path, mode: str = "wb"):
        self.path, self.mode = Path(path), mode

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f = os.fdopen(fd, self.mode)
        return self.f

    def __exit__(self, exc_type, exc, tb):
        ok = exc_type is None
        try:
            if ok:
                self.f.flush()
                os.fsync(self.f.fileno())  # data on disk before the rename makes it visible
            self.f.close()  # on a full disk close() itself can fail: then the write failed too
            if ok:
                os.chmod(self.tmp, 0o666 & ~current_umask())
                os.replace(self.tmp, self.path)
        except BaseException:
            ok = False
            raise
        finally:
            if not ok:
                if not self.f.closed:
                    try:
                        self.f.close()
                    except OSError:
                        pass  # the error that brought us here is the one to report
                if os.path.exists(self.tmp):
                    os.unlink(self.tmp)
        return False


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def regular_file(folder: Path, name, named_in: Path) -> Path:
    """folder / name, where `name` (read from `named_in`) must stay inside the folder and be a regular
    file: no absolute path, no '..', no FIFO or device (opening /dev/stdin or a FIFO would hang)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{named_in}: file name {name!r} must be a relative path inside {folder}")
    path = folder / name
    try:
        mode = path.stat().st_mode  # follows symlinks (the Hugging Face cache links into blobs/)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: named by {named_in.name} but missing" if named_in != path
                                else f"{path}: not found") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: not a regular file")
    return path


def regular(path: str | Path) -> Path:
    """`path` itself, checked as `regular_file` checks a named file: it exists and is a regular file."""
    path = Path(path)
    return regular_file(path.parent, path.name, path)


def read_json(path: Path) -> dict:
    """The JSON object in the regular file `path`; errors name the file (and the line of a bad byte)."""
    path = regular_file(path.parent, path.name, path)
    raw = path.read_bytes()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {json_kind(obj)}")
    field, value = first_nonfinite(obj)
    if field is not None:  # Python's json reads NaN, Infinity and 1e999; none is a JSON number
        raise ValueError(f"{path}: field '{field}' is {value!r}; numbers must be finite")
    return obj


def json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words (for error messages)."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


KINDS = {int: "a positive integer", float: "a positive number", bool: "true or false", str: "a string"}
REQUIRED = object()  # json_field's default: the field must be there


def json_field(obj: dict, key: str, kind: type, default=REQUIRED, source="config.json", nullable=()):
    """obj[key], type- and range-checked (ints and floats positive and finite), or `default` if absent;
    null counts as absent only for the keys in `nullable` (where the writer's own type allows it, e.g.
    transformers' `int | None`). Errors name the file (`source`), the field and the value."""
    if key not in obj or (obj[key] is None and key in nullable):
        if default is REQUIRED:
            raise ValueError(f"{source}: field '{key}' is missing")
        return default
    value = obj[key]
    if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{source}: field '{key}' must be {KINDS[kind]}, got {value!r} ({json_kind(value)})")
    if kind in (int, float) and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{source}: field '{key}' must be {KINDS[kind]}, got {value!r}")
    return float(value) if kind is float else value


def first_nonfinite(obj) -> tuple[str | None, float | None]:
    """(the path of the first NaN / inf number in a parsed JSON value, e.g. "methods[0].alpha", and the
    value), or (None, None). Iterative: as deep as json.loads itself goes."""
    stack = [("", obj)]
    while stack:
        at, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return at, value
        if isinstance(value, dict):
            stack += [(f"{at}.{k}" if at else str(k), v) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(f"{at}[{i}]", v) for i, v in reversed(list(enumerate(value)))]
    return None, None


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON, written atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


# ----------------------------------------------------------------------------------------------
# What is read or written is finite, and a weight is floating point


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nonfinite(t: torch.Tensor) -> int:
    """How many NaN / inf values `t` holds (0 for integer dtypes). Checked in chunks of 4M elements:
    a whole-tensor mask would add half the tensor's bytes to the peak."""
    if not t.is_floating_point() or all(bool(torch.isfinite(c).all()) for c in t.detach().reshape(-1).split(1 << 22)):
        return 0
    return int((~torch.isfinite(t.detach())).sum())


def check_tensor(name: str, t: torch.Tensor, where, floating: bool = True) -> None:
    """Refuse a weight that is not floating point (with floating=True) or holds NaN / inf, naming the
    file (`where`), the tensor and its dtype."""
    if floating and not t.is_floating_point():
        raise ValueError(f"{where}: tensor '{name}' has dtype {dtype_name(t.dtype)}; a weight must be floating "
                         "point (float32, bfloat16, float16 or float64)")
    n = nonfinite(t)
    if n:
        raise ValueError(f"{where}: tensor '{name}' holds {n} NaN or inf value(s) ({dtype_name(t.dtype)})")


def overflow_error(name: str, t: torch.Tensor, dtype: torch.dtype, n: int, where) -> ValueError:
    """The error for a finite tensor that a cast to `dtype` turned into `n` infs."""
    big = float(t.detach().abs().max())
    return ValueError(f"{where}: tensor '{name}' overflows {dtype_name(dtype)}: its largest |value| {big:.4g} "
                      f"exceeds {dtype_name(dtype)}'s maximum {torch.finfo(dtype).max:.4g} ({n} value(s) would "
                      "become inf); use a wider dtype (float32 or bfloat16)")


def cast_finite(name: str, t: torch.Tensor, dtype: torch.dtype, where) -> torch.Tensor:
    """`t` (a floating weight read from `where`) cast to `dtype`, checked AFTER the cast: a finite 1e5
    becomes inf in float16."""
    check_tensor(name, t, where)
    out = t.to(dtype)
    n = nonfinite(out) if out.dtype != t.dtype else 0
    if n:
        raise overflow_error(name, t, dtype, n, where)
    return out


def check_finite(state: dict[str, torch.Tensor], origin: dict[str, Path],
                 before: dict[str, torch.Tensor] | None = None) -> None:
    """NaN or inf in a weight makes every output NaN: refuse it at load, naming the tensor. Runs on the
    tensors as loaded (cast to the requested dtype); `before`, the tensors as read, tells a value the file
    holds from one the cast made (a 1e5 weight is inf in float16), and the error says which."""
    for k, v in state.items():
        n = nonfinite(v)
        if n and before is not None and before[k].dtype != v.dtype and not nonfinite(before[k]):
            raise overflow_error(k, before[k], v.dtype, n, f"{origin[k]} (loaded as {dtype_name(v.dtype)})")
        if n:
            raise ValueError(f"{origin[k]}: tensor '{k}' holds {n} NaN or inf value(s)")


def check_state(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], origin: dict[str, Path],
                path: Path) -> None:
    """The checkpoint's tensors against the model's names and shapes: missing / unexpected keys, shape
    mismatches and non-floating weights, named with the file they came from."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        files = sorted({str(origin[k]) for k in unexpected}) or [str(path)]
        raise KeyError(f"{', '.join(files)}: checkpoint does not match the config: missing keys {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                       f"{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise ValueError(f"{origin[k]}: tensor '{k}' has shape {tuple(state[k].shape)}, "
                             f"the config expects {tuple(shape)}")
        if not state[k].is_floating_point():  # an int or bool tensor would load silently as its float values
            raise ValueError(f"{origin[k]}: tensor '{k}' has dtype {dtype_name(state[k].dtype)}; a weight must be "
                             "floating point (float32, bfloat16, float16 or float64)")


def torch_save(obj, path: Path) -> None:
    """torch.save(obj) to `path` through atomic_write; a full disk raises its own OSError."""
    with atomic_write(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer hides a full disk behind "unexpected pos"
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


# ----------------------------------------------------------------------------------------------
# Files that belong together: written beside the old ones, then swapped in


STAGING_PREFIX = ".minipeft-save-"


@contextlib.contextmanager
def staged_files(folder: Path, last: Sequence[str] = (), stale: Sequence[str] = ()) -> Iterator[Path]:
    """`with staged_files(folder) as tmp:` write a set of files into `tmp`, a hidden temp folder inside
    `folder`; when the block succeeds, each is renamed into `folder` (the names in `last` last, in that
    order: the file whose presence makes the set loadable goes last), then the `stale` files (an earlier
    save in another layout) that the new set does not replace are deleted, in the order given.

    On any error while writing (a full disk: Errno 28 ENOSPC, 27 EFBIG) the temp folder is deleted and
    `folder` holds exactly what it held before. The renames that follow need no disk space. The cost:
    old and new files are on disk together for a moment."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # a folder, so not named *.tmp as atomic_write's temp files are
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=STAGING_PREFIX, suffix=".staging"))
    try:
        yield tmp
        written = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in written if n not in last] + [n for n in last if n in written]:
            os.replace(tmp / name, folder / name)
        for name in stale:
            if name not in written and ((folder / name).is_file() or (folder / name).is_symlink()):
                (folder / name).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A checkpoint folder in transformers' layout: model.safetensors, or shards model-00001-of-0000N.safetensors
# named by model.safetensors.index.json ({"weight_map": {tensor: shard}}).
INDEX = "model.safetensors.index.json"


def load_safetensors_checkpoint(path: Path, strip: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The tensors of the folder's single file or shards, and the file each came from (for error
    messages), named without the prefix `strip` (transformers' "model."; a name with and without it is
    an error). With shards, each tensor comes from the shard the index names; a tensor in another shard
    too, or in none the index lists, is an error."""
    state, origin = _load_checkpoint_files(path)
    out, where, key = {}, {}, {}
    for k, v in state.items():
        name = k.removeprefix(strip)
        if name in out:
            raise ValueError(f"{path}: '{key[name]}' and '{k}' name the same tensor")
        out[name], where[name], key[name] = v, origin[k], k
    return out, where


def _load_checkpoint_files(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    index = path / INDEX
    if not index.exists():
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"{path}: config.json found but no model.safetensors or {INDEX}")
        source = regular_file(path, "model.safetensors", path / "model.safetensors")
        tensors = load_file(source)
        return tensors, dict.fromkeys(tensors, source)
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: missing or empty 'weight_map'")
    shards = {fname: load_file(regular_file(path, fname, index)) for fname in sorted(set(weight_map.values()))}
    state, origin = {}, {}
    for fname, tensors in shards.items():
        for k in tensors:
            if k not in weight_map:
                raise KeyError(f"{path / fname}: tensor '{k}' is not listed in {INDEX}")
            if weight_map[k] != fname:
                raise ValueError(f"{path / fname}: tensor '{k}' is also in {weight_map[k]}, the shard {INDEX} "
                                 "names for it (a tensor must be in one shard only)")
            state[k], origin[k] = tensors[k], path / fname
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise KeyError(f"{index}: names {path / weight_map[absent[0]]} for '{absent[0]}', but that shard has no "
                       f"such tensor ({len(absent)} such)")
    return state, origin


def save_safetensors_checkpoint(state: dict[str, torch.Tensor], path: Path, max_shard_bytes: int | None = None) -> None:
    """model.safetensors, or shards of at most max_shard_bytes (a tensor larger than that alone) + index."""
    shards, size = [[]], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(k)
        size += nbytes
    if len(shards) == 1:
        return save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in names}, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(v.numel() * v.element_size() for v in state.values())
    write_json(path / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def checkpoint_files(path: Path) -> list[str]:
    """The weight and config files an earlier save of a model (Hugging Face or Meta layout) may have left,
    in the order to delete them: the file that makes a layout loadable before its weights (config.json,
    the index), so that each step leaves a folder that loads one whole checkpoint or the other."""
    return ["config.json", *safetensors_checkpoint_files(path), "params.json", "consolidated.00.pth"]


def safetensors_checkpoint_files(path: Path) -> list[str]:
    """The names of the folder's index, model.safetensors and shards, in the order to delete them
    (the index first: an index never names a missing shard)."""
    return [INDEX, "model.safetensors"] + sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
