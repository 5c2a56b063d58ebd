"""References: the knowledge-base text units that become explicit memories.

A document is cut into **references** of at most `max_tokens` tokens (the model's
`reference_len`, 128 in the paper; MEMORY3.md, "What one explicit memory is"). Cuts fall on token
boundaries, and every reference keeps its document id and the exact character span it covers, so it
can be shown as text: `doc_text[ref.char_start:ref.char_end]`.

Break rule (greedy, left to right). From the first token `s` not yet covered, if the rest of the
document fits in `max_tokens` it becomes the last reference. Otherwise the reference ends before
token `b`, the largest `b` in `(s, hi]` among, in this order of preference, where
`hi = s + max_tokens`, lowered to `n - max_tokens // 8` when the `n - s` tokens left fit in two
references (so that the last reference of a document is not a tiny tail):

1. a **sentence break** with at least `max_tokens // 2` tokens in the reference: whitespace
   separates tokens `b-1` and `b`, and the text before that whitespace ends with `.`, `!`, `?`,
   `;` or `:` (optionally followed by closing quotes or brackets), or the whitespace holds a
   newline (a paragraph break);
2. a **word break**: whitespace separates tokens `b-1` and `b` (in a byte-level BPE the space
   usually starts token `b`, e.g. "Ġworld");
3. a **character break**: tokens `b-1` and `b` cover disjoint characters (a character that the
   byte-level BPE writes as several byte tokens is never split between two references);
4. otherwise `s + max_tokens` (only possible for a single character longer than `max_tokens`
   tokens, which cannot happen with byte-level BPE).

Reference spans use the tokens' own offsets, so consecutive references of a document are
contiguous: `refs[k].char_end == refs[k + 1].char_start`, the first starts at the first token and
the last ends at the last token. The whitespace at a word break is inside the next reference (in
its first token), not dropped. Re-tokenizing a reference's text gives back its tokens exactly
when the reference ends on a word or sentence break (the pre-tokenizer splits at whitespace, so a
BPE merge never crosses such a break); after a character break inside a long word it may differ.
A document with no tokens (empty text) gives no reference.

Corpus files (`read_jsonl_corpus`): JSONL, one document per line, unique doc ids; the one reader
of corpus files (`m3jax build-memory --corpus`, `m3jax kb add --corpus`), so that a bad line is
refused the same way everywhere, with its file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from m3jax.memory.errors import BankError

_SENTENCE_END = re.compile(r"[.!?;:][\"'\)\]\u201d\u2019»]*$")


@dataclass(frozen=True)
class Reference:
    """One reference: `tokens` encode `doc_text[char_start:char_end]` of document `doc_id`."""

    ref_id: int
    doc_id: int
    char_start: int
    char_end: int
    tokens: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def text(self, doc_text: str) -> str:
        """This reference's text, given the text of its document."""
        return doc_text[self.char_start:self.char_end]


def _break_kind(text: str, prev_end: int, next_start: int) -> int:
    """Quality of a break between a token ending at `prev_end` and one starting at `next_start`:
    0 none (the tokens share a character), 1 character, 2 word, 3 sentence."""
    if prev_end > next_start:
        return 0
    # Whitespace around the break: the gap between the tokens (normally empty), the tail of the
    # previous token and the head of the next one.
    lo = prev_end
    while lo > 0 and text[lo - 1].isspace():
        lo -= 1
    hi = next_start
    while hi < len(text) and text[hi].isspace():
        hi += 1
    if lo == prev_end and hi == next_start:
        return 1
    space = text[lo:hi]
    if "\n" in space or _SENTENCE_END.search(text[max(0, lo - 8):lo]):
        return 3
    return 2


def _best_break(text: str, offsets: list[tuple[int, int]], s: int, hi: int, min_sentence: int) -> int:
    """The break `b` in (s, hi] preferred by the module's rule, or 0 when there is none."""
    best = {1: 0, 2: 0, 3: 0}
    for b in range(hi, s, -1):
        if b < min_sentence and best[2]:
            break  # only word breaks are left to find, and the largest one is known
        kind = _break_kind(text, offsets[b - 1][1], offsets[b][0])
        if kind == 3 and b < min_sentence:
            kind = 2  # a sentence break too early to be worth a short reference
        if kind and not best[kind]:
            best[kind] = b
            if kind == 3:
                break
    return best[3] or best[2] or best[1]


def _split_one(text: str, offsets: list[tuple[int, int]], max_tokens: int) -> list[tuple[int, int]]:
    """Token index ranges [s, e) of the references of one document."""
    n = len(offsets)
    out = []
    s = 0
    while s < n:
        if n - s <= max_tokens:
            out.append((s, n))
            break
        min_sentence = s + max(1, max_tokens // 2)
        e = 0
        if n - s <= 2 * max_tokens:  # two references left: keep the last one from being tiny
            hi = max(s + 1, min(s + max_tokens, n - max_tokens // 8))
            e = _best_break(text, offsets, s, hi, min_sentence)
        e = e or _best_break(text, offsets, s, s + max_tokens, min_sentence) or s + max_tokens
        out.append((s, e))
        s = e
    return out


def split_references(docs: Iterable[tuple[int, str]], tokenizer, max_tokens: int = 128, *,
                     batch_size: int = 4096) -> list[Reference]:
    """Cut documents `(doc_id, text)` into references of at most `max_tokens` tokens.

    tokenizer: an `m3jax.tokenizer.Tokenizer` (its `tk` is a `tokenizers.Tokenizer` that reports
    character offsets). References are numbered `ref_id = 0, 1, ...` in document order. See the
    module docstring for the break rule.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    refs: list[Reference] = []
    batch: list[tuple[int, str]] = []

    def flush() -> None:
        encs = tokenizer.tk.encode_batch([t for _, t in batch], add_special_tokens=False)
        for (doc_id, text), enc in zip(batch, encs):
            ids, offsets = enc.ids, enc.offsets
            for s, e in _split_one(text, offsets, max_tokens):
                refs.append(Reference(len(refs), int(doc_id), offsets[s][0], offsets[e - 1][1],
                                      tuple(ids[s:e])))
        batch.clear()

    for doc_id, text in docs:
        batch.append((doc_id, text))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return refs


def pad_references(refs: Iterable[Reference], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack references into `tokens` int32 [n, length] (valid tokens first, then `pad_id`) and
    `mask` bool [n, length] (True on valid tokens), the input of the memory write path."""
    refs = list(refs)
    tokens = np.full((len(refs), length), pad_id, np.int32)
    mask = np.zeros((len(refs), length), bool)
    for i, r in enumerate(refs):
        if len(r.tokens) > length:
            raise ValueError(f"reference {r.ref_id} has {len(r.tokens)} tokens, more than length={length}")
        tokens[i, :len(r.tokens)] = r.tokens
        mask[i, :len(r.tokens)] = True
    return tokens, mask


# ---------------------------------------------------------------------- many references as arrays
INFO_FIELDS = ("length", "doc_id", "char_start", "char_end")  # the bank's refs/info columns


@dataclasses.dataclass
class ReferenceBatch:
    """N references as NumPy columns, the form a memory bank stores and returns
    (`MemoryBank.metadata`): the same fields as `Reference`, one row per reference.

    tokens [N, R] int32 (token ids, padded with pad_id), lengths [N] int32, doc_id [N] int64,
    char_start [N] int64, char_end [N] int64 (character span in the document). `of(references)`
    makes one from `Reference`s, `references(ids)` gives them back.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    doc_id: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def take(self, idx: Any) -> "ReferenceBatch":
        return ReferenceBatch(*(np.asarray(getattr(self, f.name))[idx] for f in dataclasses.fields(self)))

    @staticmethod
    def concat(items: "Sequence[ReferenceBatch]") -> "ReferenceBatch":
        return ReferenceBatch(*(np.concatenate([getattr(m, f.name) for m in items])
                                for f in dataclasses.fields(ReferenceBatch)))

    def info(self) -> np.ndarray:
        """[N, 4] int64: (length, doc_id, char_start, char_end), the stored layout (INFO_FIELDS)."""
        return np.stack([self.lengths, self.doc_id, self.char_start, self.char_end], 1).astype(np.int64)

    @classmethod
    def from_info(cls, tokens: np.ndarray, info: np.ndarray) -> "ReferenceBatch":
        return cls(tokens, info[:, 0].astype(np.int32), info[:, 1], info[:, 2], info[:, 3])

    @classmethod
    def of(cls, references: Sequence[Reference], reference_len: int, pad_id: int = 0) -> "ReferenceBatch":
        """The columns of `references` (each of 1..reference_len tokens), tokens padded with pad_id."""
        for i, r in enumerate(references):
            if not isinstance(r, Reference):
                raise BankError(f"reference {i} is a {type(r).__name__}, not an m3jax.memory.references.Reference")
            if len(r.tokens) == 0:
                raise BankError(f"reference {i} has no tokens")
            if len(r.tokens) > reference_len:
                raise BankError(f"reference {i} has {len(r.tokens)} tokens, more than reference_len={reference_len}")
        tokens, mask = pad_references(references, reference_len, pad_id)
        info = np.array([(r.doc_id, r.char_start, r.char_end) for r in references], np.int64).reshape(-1, 3)
        return cls(tokens, mask.sum(1).astype(np.int32), info[:, 0], info[:, 1], info[:, 2])

    def references(self, ids: Sequence[int] | None = None) -> list[Reference]:
        """The rows as `Reference`s; `ids` are their reference ids (default 0..N-1)."""
        ids = range(len(self)) if ids is None else ids
        return [Reference(int(i), int(self.doc_id[j]), int(self.char_start[j]), int(self.char_end[j]),
                          tuple(int(t) for t in self.tokens[j, : self.lengths[j]]))
                for j, i in enumerate(ids)]

    @classmethod
    def coerce(cls, meta: "ReferenceBatch | dict[str, Any]", n: int, reference_len: int,
               pad_id: int = 0) -> "ReferenceBatch":
        """Validate (and convert a dict of the field names' columns) for n references of R tokens;
        shorter token rows are padded with `pad_id`."""
        if isinstance(meta, dict):
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
            if missing:
                raise BankError(f"metadata dict lacks {missing}; it needs tokens [N, R], lengths, "
                                f"doc_id, char_start, char_end [N]")
            meta = cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})
        tokens = np.asarray(meta.tokens)
        if tokens.ndim != 2 or tokens.shape[0] != n or tokens.shape[1] > reference_len:
            raise BankError(f"metadata tokens of shape {tokens.shape}: expected [{n}, <= {reference_len}]")
        if tokens.shape[1] < reference_len:
            tokens = np.pad(tokens, ((0, 0), (0, reference_len - tokens.shape[1])), constant_values=pad_id)
        out = [tokens.astype(np.int32)]
        for f, dt in (("lengths", np.int32), ("doc_id", np.int64), ("char_start", np.int64),
                      ("char_end", np.int64)):
            a = np.asarray(getattr(meta, f))
            if a.shape != (n,):
                raise BankError(f"metadata {f} of shape {a.shape}: expected ({n},)")
            if not np.issubdtype(a.dtype, np.integer):
                raise BankError(f"metadata {f} must hold integers, got dtype {a.dtype}")
            out.append(a.astype(dt))
        m = cls(*out)
        if np.any(m.lengths < 0) or np.any(m.lengths > reference_len):
            raise BankError(f"metadata lengths must be in [0, {reference_len}], got {m.lengths}")
        return m


ReferenceMeta = ReferenceBatch  # its former name (m3jax.memory.bank.ReferenceMeta)


# ---------------------------------------------------------------------- corpus files
class CorpusError(ValueError):
    """A corpus file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class CorpusDocument:
    """One document of a JSONL corpus: `record` is its whole JSON object (other fields such as
    description or topic), `line` its 1-based line number."""

    doc_id: int
    text: str
    title: str | None
    line: int
    record: dict

    def get_str(self, key: str) -> str:
        """A string field of the record ("" when absent or null)."""
        v = self.record.get(key)
        return "" if v is None else str(v)


_MISSING_IDS = ("line", "ordinal", "hash")


def read_jsonl_corpus(path: str, *, missing_id: str = "line") -> list[CorpusDocument]:
    """The documents of a JSONL corpus: one JSON object per non-blank line, with a string `text`,
    an optional `doc_id` (an integer in [0, 2**63)) and optional string `title`, `description`,
    `topic`. A line without `doc_id` gets one by `missing_id`: "line" (its 0-based line index),
    "ordinal" (the number of documents before it) or "hash" (a 60-bit hash of its text, the same
    on every rerun). Doc ids are unique: a repeat is refused naming both lines (references of two
    documents under one id would be read with the other one's text). Anything else that is wrong
    (bytes that are not UTF-8, a line that is not a JSON object, wrong field types) raises
    CorpusError naming the file and the line; a missing file FileNotFoundError."""
    if missing_id not in _MISSING_IDS:
        raise ValueError(f"missing_id must be one of {_MISSING_IDS}, got {missing_id!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus {path}: no such file")
    docs: list[CorpusDocument] = []
    seen: dict[int, int] = {}
    try:
        with open(path, "rb") as f:
            for index, raw in enumerate(f):
                n = index + 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                      f"{e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise CorpusError(f"{path}:{n}: not a JSON object ({e})") from None
                if not isinstance(r, dict):
                    raise CorpusError(f"{path}:{n}: a JSON {type(r).__name__}, not an object with a 'text' field")
                text = r.get("text")
                if not isinstance(text, str):
                    raise CorpusError(f"{path}:{n}: 'text' must be a string, got "
                                      f"{'nothing' if text is None else type(text).__name__}")
                for key in ("text", "title", "description", "topic"):
                    if r.get(key) is not None and not isinstance(r[key], str):
                        raise CorpusError(f"{path}:{n}: '{key}' must be a string, got {type(r[key]).__name__}")
                    try:
                        (r.get(key) or "").encode("utf-8")
                    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800"
                        raise CorpusError(f"{path}:{n}: '{key}' holds an unpaired surrogate "
                                          f"{e.object[e.start]!r}: not text") from None
                if "doc_id" in r:
                    doc_id = r["doc_id"]
                    if isinstance(doc_id, bool) or not isinstance(doc_id, int) or not 0 <= doc_id < 2**63:
                        raise CorpusError(f"{path}:{n}: doc_id {doc_id!r} is not an integer in [0, 2**63)")
                elif missing_id == "line":
                    doc_id = index
                elif missing_id == "ordinal":
                    doc_id = len(docs)
                else:
                    doc_id = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16)
                if doc_id in seen:
                    hashed = "doc_id" not in r and missing_id == "hash"
                    same = " (the same text: give the lines doc ids)" if hashed else ""
                    raise CorpusError(f"{path}:{n}: doc_id {doc_id} repeats the one of line {seen[doc_id]}{same}: "
                                      f"doc ids must be unique")
                seen[doc_id] = n
                docs.append(CorpusDocument(doc_id, text, r.get("title"), n, r))
    except OSError as e:
        raise CorpusError(f"{path}: cannot read the corpus ({e.strerror or e})") from None
    return docs
