"""Llama 3 tokenizer: byte-level BPE run by tiktoken, 256 special tokens, and the chat format.

Llama 3 swapped Llama 2's SentencePiece model for a 128,000-rank byte-level BPE vocabulary
("100K tokens from the tiktoken tokenizer with 28K additional tokens", The Llama 3 Herd of
Models, arXiv:2407.21783, §3.2). Text is split into pieces by a regular expression (the split
pattern below; digits go in groups of at most three), each piece's UTF-8 bytes are merged by
rank (BPE, Sennrich et al., arXiv:1508.07909; byte-level as in GPT-2), and the 256 special
tokens take the ids right after the ranks: for the real vocabulary 128000..128255.

Reads Meta's `tokenizer.model` (one `base64(token) rank` per line) or Hugging Face's
`tokenizer.json` (`model.vocab` holds GPT-2's printable `bytes_to_unicode` strings; ids are
ranks; `added_tokens` lists the specials). `Tokenizer.byte_level()` is the same class with
256 byte tokens, for toy models that need no vocabulary file.

Chat format (Meta's Llama 3.1 prompt format): `<|begin_of_text|>`, then per message
`<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>`, then an open assistant header.
Reference implementation: meta-llama/llama-models `models/llama3/tokenizer.py` and `chat_format.py`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import AbstractSet, Literal, Sequence

import tiktoken

from .safetensors_io import regular

PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256
_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
          "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
          "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
# Llama 3.1/3.2 text names; the rest are reserved_special_token_2 .. _246 (256 in all).
SPECIAL_NAMES = _NAMED + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL - len(_NAMED))]
ROLES = ("system", "user", "assistant", "ipython")
# tiktoken panics past ~400k characters, and slows badly on very long runs of (non-)whitespace
# (openai/tiktoken#195); Meta's reference cuts the text at these lengths, and so do we.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def read_utf8(path: Path) -> str:
    """The text of the regular file `path` (a FIFO or device is refused: reading it would hang); a byte
    that is not UTF-8 is an error naming the file, line and column."""
    raw = regular(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col})") from None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (how tokenizer.json spells bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]  # control bytes and spaces move to 256+
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _read_tiktoken_model(text: str, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    line_of: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields, where = line.split(), f"{path}:{lineno}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'base64token rank', got {line!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error:
            token = b""
        if not token:
            raise ValueError(f"{where}: invalid base64 token {fields[0]!r}")
        if not re.fullmatch(r"[0-9]+", fields[1]):
            raise ValueError(f"{where}: rank must be a non-negative integer, got {fields[1]!r}")
        rank = int(fields[1])
        if rank in line_of:
            raise ValueError(f"{where}: duplicate rank {rank} (first on line {line_of[rank]})")
        if token in ranks:
            raise ValueError(f"{where}: duplicate token {token!r} (first on line {line_of[ranks[token]]})")
        ranks[token], line_of[rank] = rank, lineno
    return ranks


def _read_tokenizer_json(text: str, path: Path) -> tuple[dict[bytes, int], dict[str, int] | None]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if isinstance(model, dict) and (model.get("type", "BPE") != "BPE" or model.get("byte_fallback")):
        raise ValueError(f"{path}: unsupported 'model.type' {model.get('type')!r} "
                         f"(byte_fallback={model.get('byte_fallback')}); expected byte-level 'BPE'")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: missing key 'model.vocab' (a dict from token string to id)")
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks = {}
    for token, rank in model["vocab"].items():
        if not isinstance(rank, int) or any(ch not in byte_of for ch in token):
            raise ValueError(f"{path}: 'model.vocab' entry {token!r}: {rank!r} is not a byte-level "
                             f"(GPT-2 bytes_to_unicode) token with an integer id")
        ranks[bytes(byte_of[ch] for ch in token)] = rank
    specials = {}
    for i, added in enumerate(doc.get("added_tokens", [])):
        if not (isinstance(added, dict) and isinstance(added.get("content"), str)
                and isinstance(added.get("id"), int)):
            raise ValueError(f"{path}: 'added_tokens[{i}]' needs a string 'content' and an integer 'id'")
        specials[added["content"]] = added["id"]
    return ranks, specials or None


def _check(ranks: dict[bytes, int], specials: dict[str, int], source: str) -> None:
    """Ranks 0..N-1 with every byte; specials at N.. with Meta's names in Meta's positions."""
    base = len(ranks)
    if sorted(ranks.values()) != list(range(base)):
        missing = min(set(range(base)) - set(ranks.values()))
        raise ValueError(f"{source}: ranks must be 0..{base - 1} with no gaps; rank {missing} is missing")
    if missing_bytes := [b for b in range(256) if bytes([b]) not in ranks]:
        raise ValueError(f"{source}: byte-level BPE needs all 256 single bytes; "
                         f"byte {missing_bytes[0]} has no token")
    ids = sorted(specials.values())
    if ids != list(range(base, base + len(ids))) or len(ids) < len(_NAMED):
        raise ValueError(f"{source}: 'added_tokens' must hold at least {len(_NAMED)} ids running from {base} "
                         f"(right after the {base} ranks) with no gaps; got {len(ids)} ids {ids[:3]}...")
    for offset, name in enumerate(_NAMED):  # a name may be missing (HF's Llama 3.0 has no eom_id)
        if specials.get(name, base + offset) != base + offset:
            raise ValueError(f"{source}: 'added_tokens' puts {name} at id {specials[name]}; "
                             f"Llama 3 puts it at {base + offset} (ranks + {offset})")


class Tokenizer:
    """Llama 3 tokenizer: `encode`/`decode` text, and the chat format, on top of tiktoken."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None,
                 source: str = "<memory>") -> None:
        base = len(ranks)
        canonical = {name: base + i for i, name in enumerate(SPECIAL_NAMES)}
        self.special_tokens: dict[str, int] = dict(special_tokens or canonical)
        _check(ranks, self.special_tokens, source)
        self.mergeable_ranks, self.source = ranks, source
        self.model = tiktoken.Encoding(name=Path(source).name, pat_str=PAT_STR,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size: int = base + len(self.special_tokens)
        # Ids by position, as Meta's reference does: HF's Llama 3.0 file names +8 a reserved token.
        at = canonical.__getitem__
        self.bos_id, self.eos_id = at("<|begin_of_text|>"), at("<|end_of_text|>")
        self.pad_id = at("<|finetune_right_pad_id|>")
        self.start_header_id, self.end_header_id = at("<|start_header_id|>"), at("<|end_header_id|>")
        self.eom_id, self.eot_id = at("<|eom_id|>"), at("<|eot_id|>")
        self.stop_ids: set[int] = {self.eos_id, self.eom_id, self.eot_id}

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.model`, a `tokenizer.json`, or a directory holding one (.model first)."""
        path = Path(path)
        if path.is_dir():
            found = [p for p in (path / "tokenizer.model", path / "tokenizer.json") if p.exists()]
            if not found:
                raise FileNotFoundError(f"{path}: directory holds neither tokenizer.model nor tokenizer.json")
            path = found[0]
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        text = read_utf8(path)  # refuses a FIFO or device
        if text.lstrip().startswith("{"):  # JSON; a base64 line can never start with "{"
            return cls(*_read_tokenizer_json(text, path), source=str(path))
        return cls(_read_tiktoken_model(text, path), source=str(path))

    def check_model_vocab(self, vocab_size: int, model_source: str = "the model") -> None:
        """Every id this tokenizer can produce must have a row in the model's embedding."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"{self.source}: the tokenizer has {self.vocab_size} ids (ranks + specials) but "
                             f"{model_source} has an embedding for only {vocab_size}: they do not belong together")

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """256 byte tokens (id = byte value) and the 256 specials at 256..511: no file needed."""
        return cls({bytes([b]): b for b in range(256)}, source="byte_level")

    def save(self, path: str | Path) -> None:
        """Write the ranks in tokenizer.model format (the specials follow from their count)."""
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        Path(path).write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank))

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allowed_special: Literal["all"] | AbstractSet[str] = frozenset()) -> list[int]:
        """Token ids of `text`. Special-token text stays plain text unless named in `allowed_special`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for start in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[start:start + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids += self.model.encode(piece, allowed_special=allowed_special, disallowed_special=())
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (a list, tensor or array); bytes that are not valid UTF-8 become U+FFFD."""
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.model.decode(ids)

    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>` then "\\n\\n"."""
        if role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {role!r}")
        return [self.start_header_id, *self.encode(role), self.end_header_id, *self.encode("\n\n")]

    def encode_message(self, message: dict) -> list[int]:
        """Header, the stripped content, `<|eot_id|>`, for {"role": ..., "content": ...}."""
        if not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f"message needs a 'role' and a string 'content', got {message!r}")
        return self.encode_header(message["role"]) + self.encode(message["content"].strip()) + [self.eot_id]

    def encode_dialog_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """`<|begin_of_text|>`, each message, then (by default) an open assistant header to answer in."""
        ids = [self.bos_id]
        for message in messages:
            ids += self.encode_message(message)
        return ids + self.encode_header("assistant") if add_generation_prompt else ids


def _split_long_runs(text: str, limit: int) -> list[str]:
    """Cut runs of more than `limit` (non-)whitespace characters every `limit` characters: Meta's
    `_split_whitespaces_or_nonwhitespaces` cuts, found by a regex rather than a per-character loop."""
    long_run = re.compile(rf"\s{{{limit + 1},}}|\S{{{limit + 1},}}")
    cuts = [m.start() + k for m in long_run.finditer(text) for k in range(limit, m.end() - m.start(), limit)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]
