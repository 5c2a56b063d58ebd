"""Knowledge bases: build, add documents, delete documents, open. References -> bank + index on disk.

Layout of a knowledge-base directory (the `m3jax build-memory` output):

    kb.json            the committed state: model name, fingerprint, embedder, codec, counts,
                       `references` (committed memories) and `index_dir` (the index serving them)
    documents.jsonl    one line per document ever added, in memory-id order: doc_id, `first`
                       memory id, `count` of references, sha256 of its text, title (optional),
                       deleted (optional)
    bank/              the MemoryBank (TensorStore zarr3): coded memories + reference metadata
    embeddings.npy     reference vectors (cached; the build resumes here after a kill)
    index/, index-N/   the VectorIndex (ScaNN or exact) over the embeddings, ids = memory ids;
                       `index-N` is written by an add that brings the base to N references
    add.pending.json   only while an add is unfinished: its journal (base, references, digest)

Memory id = bank row = index id; a document's references are consecutive memories
`first .. first + count - 1`. kb.json is the commit point of every update: it is replaced
atomically (temp file + os.replace) and names the index that serves the committed memories, so a
reader never sees half an update.

Adding (`KnowledgeBase.add`; the initial build is the same path on an empty base): split the
documents into references, write the journal, append their memories to the bank (which resumes at
its own committed count and refuses other weights by fingerprint), embed them
(`embeddings.pending.npy`, resumable), load the committed index, add the vectors, save it as
`index-N`, fold the vectors into embeddings.npy, write documents.jsonl with the new records, then
commit kb.json and clean up (old index, pending files, the journal last). Every step is
idempotent: killed anywhere and run again with the same documents, the add resumes from the
journal and ends with exactly one copy of each reference (documents.jsonl records past kb.json's
`references` are ignored as uncommitted). A journal for other documents blocks new adds.

Deleting (`KnowledgeBase.delete`) keeps the memories and the index as they are and marks the
documents deleted in documents.jsonl (one atomic write, the durable point), then updates kb.json's
counts. Retrievers of the knowledge base skip deleted references (`Retriever(exclude=...)`) and
search deeper so that k live references still come back. Deleted doc ids may be added again (new
memory ids); deleted memories keep their space until the knowledge base is rebuilt.

Every stage of a build resumes: the bank build continues from its committed count, embeddings are
written in blocks (`embeddings.npy.partial.npy`) and the index is rebuilt only if missing.

Derived files record what they were derived from, and are rebuilt when that differs: an
embeddings cache has a sidecar `<file>.json` with the key of its texts and embedder
(`embeddings_key`; a partial file counts only under the same key, and one that cannot be read is
dropped, not fatal), an index records the digest of its vectors and ids (`VectorIndex.source`).
So a directory rebuilt with another corpus never serves the old vectors; and building into a
knowledge base that already holds a live doc_id with another text is refused (the document
records keep the sha256 of each text; records written before that cannot be compared). kb.json
and the other JSON files are checked when read: a damaged one raises KnowledgeBaseError naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from m3jax.config import ModelConfig
from m3jax.memory.bank import MemoryBank
from m3jax.memory.embed import Embedder, SentenceEmbedder
from m3jax.memory.encode import make_encode_fn
from m3jax.memory.fingerprint import params_fingerprint
from m3jax.memory.index import VectorIndex, read_npy, source_of
from m3jax.memory.overlap import EVAL_THRESHOLD
from m3jax.memory.populate import build_bank
from m3jax.memory.references import Reference, split_references
from m3jax.memory.retrieve import Retriever

KB_FORMAT = "m3jax-knowledge-base"
INFO_FILE = "kb.json"
DOCUMENTS_FILE = "documents.jsonl"
JOURNAL_FILE = "add.pending.json"
EMBEDDINGS_FILE = "embeddings.npy"
PENDING_EMBEDDINGS_FILE = "embeddings.pending.npy"
BANK_DIR = "bank"
INDEX_DIR = "index"
_INDEX_NAME = re.compile(r"^index(-\d+)?$")
_JOURNAL_FORMAT = "m3jax-kb-pending-add"
_EMBEDDINGS_FORMAT = "m3jax-embeddings"


class KnowledgeBaseError(ValueError):
    """A refused knowledge-base update (duplicate or unknown doc id, pending add, bad input)."""


@dataclass(frozen=True)
class DocumentRecord:
    """One document of a knowledge base: its references are memories first .. first + count - 1."""

    doc_id: int
    first: int
    count: int
    title: str | None = None
    deleted: bool = False
    sha256: str | None = None  # of the text (`_text_digest`); None in records written before it

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"doc_id": self.doc_id, "first": self.first, "count": self.count}
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        if self.title is not None:
            d["title"] = self.title
        if self.deleted:
            d["deleted"] = True
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DocumentRecord":
        ints = [d["doc_id"], d["first"], d["count"]]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints):
            raise ValueError(f"doc_id, first and count must be non-negative integers, got {ints}")
        for key in ("title", "sha256"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ValueError(f"{key} must be a string, got {d[key]!r}")
        return cls(*ints, d.get("title"), bool(d.get("deleted", False)), d.get("sha256"))


# ---------------------------------------------------------------------- files
def _write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically: a temp file, fsync, os.replace."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_info(directory: str, info: dict[str, Any]) -> None:
    """Commit kb.json (the commit point of every update)."""
    _write_atomic(os.path.join(directory, INFO_FILE), json.dumps(info, indent=1) + "\n")


def _write_documents(directory: str, records: Sequence[DocumentRecord]) -> None:
    _write_atomic(os.path.join(directory, DOCUMENTS_FILE),
                  "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records))


def _read_json(path: str, what: str) -> Any:
    """The JSON value of a file, or KnowledgeBaseError naming it (truncated, not UTF-8, ...)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise KnowledgeBaseError(f"{path} is not valid JSON ({e}): the {what} is damaged") from None


def _read_info(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, INFO_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no knowledge base at {directory!r} ({INFO_FILE} missing): build one with "
                                "`m3jax build-memory`")
    info = _read_json(path, "knowledge base")
    if not isinstance(info, dict) or info.get("format") != KB_FORMAT:
        raise KnowledgeBaseError(f"{path} is not an m3jax knowledge base description")
    refs = info.get("references", 0)  # absent: as many as the index holds
    if isinstance(refs, bool) or not isinstance(refs, int) or refs < 0:
        raise KnowledgeBaseError(f"{path}: 'references' is {refs!r}, not a count")
    index_dir = info.get("index_dir", INDEX_DIR)
    if not isinstance(index_dir, str) or not _INDEX_NAME.match(index_dir):
        raise KnowledgeBaseError(f"{path}: 'index_dir' is {index_dir!r}, not an index directory of the "
                                 f"knowledge base (index or index-N)")
    return info


def _read_documents(directory: str, committed: int) -> list[DocumentRecord] | None:
    """The committed document records (those within the first `committed` memories), or None when
    the knowledge base has no documents.jsonl (built before it existed)."""
    path = os.path.join(directory, DOCUMENTS_FILE)
    if not os.path.exists(path):
        return None
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                r = DocumentRecord.from_json(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError,
                    RecursionError) as e:
                raise KnowledgeBaseError(f"{path}:{n}: bad document record ({e})") from None
            if r.first + r.count <= committed:  # later records belong to an uncommitted add
                out.append(r)
    return out


def _records_from_bank(bank: MemoryBank, n: int) -> list[DocumentRecord]:
    """Document records derived from the bank's reference metadata (runs of one doc_id)."""
    if n == 0:
        return []
    doc = bank.metadata(np.arange(n)).doc_id
    starts = np.flatnonzero(np.concatenate([[True], doc[1:] != doc[:-1]]))
    ends = np.concatenate([starts[1:], [n]])
    return [DocumentRecord(int(doc[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


def _load_records(directory: str, committed: int, bank: MemoryBank) -> list[DocumentRecord]:
    records = _read_documents(directory, committed)
    return records if records is not None else _records_from_bank(bank, committed)


def _read_journal(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, JOURNAL_FILE)
    if not os.path.exists(path):
        return None
    try:
        j = _read_json(path, "pending add's journal")
        if not isinstance(j, dict) or j.get("format") != _JOURNAL_FORMAT:
            raise ValueError(f"format {j.get('format') if isinstance(j, dict) else j!r}")
        for key in ("base", "references"):
            if isinstance(j[key], bool) or not isinstance(j[key], int) or j[key] < 0:
                raise ValueError(f"{key} {j[key]!r} is not a count")
        if not isinstance(j["digest"], str):
            raise ValueError(f"digest {j['digest']!r} is not a string")
    except (KnowledgeBaseError, KeyError, TypeError, ValueError) as e:
        raise KnowledgeBaseError(f"{path} is damaged ({e}); remove it only if the bank holds no memories "
                                 f"past kb.json's references") from None
    return j


def _disk_bytes(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _counts(records: Sequence[DocumentRecord]) -> dict[str, int]:
    live = [r for r in records if not r.deleted]
    dead = [r for r in records if r.deleted]
    return {"documents": len(live), "deleted_documents": len(dead),
            "live_references": sum(r.count for r in live), "deleted_references": sum(r.count for r in dead)}


# ---------------------------------------------------------------------- embeddings
def embeddings_key(texts: Sequence[str], embedder: Embedder) -> str:
    """What an embeddings cache is derived from: the texts in order and the embedder (its class,
    model directory or function, max_len, dim)."""
    fn = getattr(embedder, "fn", None)
    ident = "|".join(str(x) for x in (type(embedder).__qualname__, getattr(embedder, "model_dir", ""),
                                      getattr(fn, "__module__", ""), getattr(fn, "__qualname__", ""),
                                      getattr(embedder, "max_len", ""), embedder.dim))
    h = hashlib.sha256(b"m3jax.embeddings.v1\0" + ident.encode() + b"\0")
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little") + b)
    return "sha256:" + h.hexdigest()


def _embeddings_record(path: str) -> dict[str, Any] | None:
    """The sidecar `<path>.json` of an embeddings cache, or None (missing or unreadable: stale)."""
    try:
        with open(path + ".json", encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == _EMBEDDINGS_FORMAT else None


def _write_embeddings_record(path: str, key: str, count: int, dim: int) -> None:
    _write_atomic(path + ".json", json.dumps({"format": _EMBEDDINGS_FORMAT, "key": key, "count": count,
                                              "dim": dim}) + "\n")


def _read_vectors(path: str, dim: int, max_rows: int | None = None) -> np.ndarray | None:
    """float32 [m, dim] vectors of a cache file, or None when it is unreadable (truncated, killed
    mid-write), of another shape or not finite: then it is only a cache to recompute."""
    try:
        v = read_npy(path, "embeddings")
    except ValueError:
        return None
    ok = v.ndim == 2 and v.shape[1] == dim and v.dtype == np.float32 and (max_rows is None or len(v) <= max_rows)
    return v if ok and np.all(np.isfinite(v)) else None


def embed_cached(texts: Sequence[str], embedder: Embedder, path: str, *, block: int = 1024,
                 show_progress: bool = True) -> np.ndarray:
    """Embed `texts` into float32 [n, dim] saved at `path`, resuming from a partial file.

    The cache is used only when its sidecar `<path>.json` holds the same `embeddings_key` (the
    texts and the embedder): other texts or another embedder recompute it. A partial file that
    cannot be read (a half-written block) is dropped and embedding restarts from zero."""
    n = len(texts)
    key = embeddings_key(texts, embedder)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial.npy"
    rec = _embeddings_record(path)
    if rec is not None and rec.get("key") == key:
        if os.path.exists(path):
            v = _read_vectors(path, embedder.dim)
            if v is not None and len(v) == n:
                return v
    else:  # stale or unknown: derived from other texts or by another embedder
        for f in (path, partial):
            if os.path.exists(f):
                os.remove(f)
        _write_embeddings_record(path, key, n, embedder.dim)
    done = 0
    out = np.zeros((n, embedder.dim), np.float32)
    if os.path.exists(partial):
        p = _read_vectors(partial, embedder.dim, max_rows=n)
        if p is None:
            os.remove(partial)
        else:
            done = len(p)
            out[:done] = p
    bar = tqdm(total=n, initial=done, desc="embedding references", unit="ref", disable=not show_progress)
    while done < n:
        end = min(n, done + block)
        out[done:end] = embedder(list(texts[done:end]))
        done = end
        tmp = partial + ".tmp.npy"
        np.save(tmp, out[:done])
        os.replace(tmp, partial)
        bar.update(end - bar.n)
    bar.close()
    tmp = path + ".tmp.npy"
    np.save(tmp, out)
    os.replace(tmp, path)
    if os.path.exists(partial):
        os.remove(partial)
    return out


def _merge_embeddings(directory: str, base: int, vecs: np.ndarray, key: str, *, block: int = 1 << 16) -> None:
    """embeddings.npy := its first `base` rows + `vecs` (of embeddings key `key`; atomic,
    idempotent; its record chains the two keys). A cache that does not hold the first `base`
    vectors, or has no record, is stale and removed (the index is the source of truth)."""
    main = os.path.join(directory, EMBEDDINGS_FILE)
    if not os.path.exists(main):
        return
    rec = _embeddings_record(main)
    try:
        old = np.load(main, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        old = None
    if old is None or rec is None or old.ndim != 2 or old.shape[1] != vecs.shape[1] or len(old) < base:
        del old
        for f in (main, main + ".json"):
            if os.path.exists(f):
                os.remove(f)
        return
    if rec.get("merged") == key and len(old) == base + len(vecs):  # already merged (a resumed add)
        return
    tmp = main + ".tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(base + len(vecs), vecs.shape[1]))
    for s in range(0, base, block):
        out[s:min(base, s + block)] = old[s:min(base, s + block)]
    out[base:] = vecs
    out.flush()
    del out, old
    merged = "sha256:" + hashlib.sha256(f"{rec.get('key')}[:{base}]+{key}".encode()).hexdigest()
    _write_atomic(main + ".json", json.dumps({"format": _EMBEDDINGS_FORMAT, "key": merged,
                                              "count": base + len(vecs), "dim": int(vecs.shape[1]),
                                              "merged": key}) + "\n")
    os.replace(tmp, main)


def default_embedder(name: str | None = None, **kwargs: Any) -> Embedder:
    """The embedder named in kb.json: "minilm" (the shipped all-MiniLM-L6-v2) or a model dir."""
    if name in (None, "minilm"):
        return SentenceEmbedder(**kwargs)
    return SentenceEmbedder(name, **kwargs)


# ---------------------------------------------------------------------- documents
def _doc_id(x: Any, where: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise KnowledgeBaseError(f"{where}: doc_id {x!r} is not an integer")
    if not 0 <= int(x) < 2**63:
        raise KnowledgeBaseError(f"{where}: doc_id {int(x)} is outside [0, 2**63)")
    return int(x)


def _normalize_documents(documents: Iterable[Any], where: str) -> list[tuple[int, str, str | None]]:
    """(doc_id, text) / (doc_id, text, title) tuples, dicts or objects with those fields ->
    (doc_id, text, title) with unique integer doc ids."""
    out: list[tuple[int, str, str | None]] = []
    seen: set[int] = set()
    for i, d in enumerate(documents):
        if isinstance(d, dict):
            if "doc_id" not in d or "text" not in d:
                raise KnowledgeBaseError(f"{where}: document {i} lacks a 'doc_id' or 'text' field")
            doc_id, text, title = d["doc_id"], d["text"], d.get("title")
        elif isinstance(d, (tuple, list)):
            if len(d) not in (2, 3):
                raise KnowledgeBaseError(f"{where}: document {i} is a {len(d)}-tuple; expected "
                                         f"(doc_id, text) or (doc_id, text, title)")
            doc_id, text, title = d[0], d[1], d[2] if len(d) == 3 else None
        elif hasattr(d, "doc_id") and hasattr(d, "text"):
            doc_id, text, title = d.doc_id, d.text, getattr(d, "title", None)
        else:
            raise KnowledgeBaseError(f"{where}: document {i} is a {type(d).__name__}; expected "
                                     f"(doc_id, text) or (doc_id, text, title)")
        doc_id = _doc_id(doc_id, where)
        if not isinstance(text, str):
            raise KnowledgeBaseError(f"{where}: the text of doc_id {doc_id} is a {type(text).__name__}, not a str")
        if title is not None and not isinstance(title, str):
            raise KnowledgeBaseError(f"{where}: the title of doc_id {doc_id} is a {type(title).__name__}, not a str")
        if doc_id in seen:
            raise KnowledgeBaseError(f"{where}: doc_id {doc_id} appears twice among the documents given")
        seen.add(doc_id)
        out.append((doc_id, text, title))
    return out


def _text_digest(text: str) -> str:
    """sha256 of a document's text (kept in its record: a rebuild with another text is refused)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _digest(docs: Sequence[tuple[int, str, str | None]], refs: Sequence[Reference]) -> str:
    """What an add writes: the documents (ids, titles, texts) and their references."""
    h = hashlib.sha256(b"m3jax.kb.add.v1\0")
    for doc_id, text, title in docs:
        h.update(json.dumps([doc_id, title, _text_digest(text)]).encode() + b"\0")
    for r in refs:
        h.update(np.asarray([r.doc_id, r.char_start, r.char_end, len(r.tokens), *r.tokens], np.int64).tobytes())
    return "sha256:" + h.hexdigest()


def _preview(ids: Sequence[int], n: int = 5) -> str:
    return ", ".join(map(str, ids[:n])) + (", ..." if len(ids) > n else "")


# ---------------------------------------------------------------------- the knowledge base
@dataclass
class KnowledgeBase:
    """An opened knowledge base: the bank, the index, kb.json's `info` and the document records.

    Retrievers made by `retriever()` skip deleted references, also those deleted after they were
    made; they search the index as it was when they were made (make a new one after `add`).
    """

    directory: str
    bank: MemoryBank
    index: VectorIndex
    info: dict[str, Any]
    records: list[DocumentRecord] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._reindex()

    def _reindex(self) -> None:
        """Lookup arrays over `records`: deleted mask per memory id, record of each memory id."""
        n = self.references
        deleted = np.zeros(n, bool)
        for r in self.records:
            if r.deleted:
                deleted[r.first:r.first + r.count] = True
        self._deleted = deleted  # replaced, never mutated: retrievers read it without a lock
        nz = [i for i, r in enumerate(self.records) if r.count > 0]
        self._firsts = np.array([self.records[i].first for i in nz], np.int64)
        self._ends = np.array([self.records[i].first + self.records[i].count for i in nz], np.int64)
        self._rec_of = np.array(nz, np.int64)
        self._rec_doc = np.array([r.doc_id for r in self.records], np.int64)

    # ------------------------------------------------------------------ counts
    @property
    def references(self) -> int:
        """Committed memories (live and deleted): ids 0 .. references - 1."""
        return int(self.info.get("references", len(self.index)))

    def documents(self, *, include_deleted: bool = False) -> list[DocumentRecord]:
        """The document records, in memory-id order (deleted ones only with include_deleted)."""
        return [r for r in self.records if include_deleted or not r.deleted]

    def summary(self) -> dict[str, Any]:
        """Counts, codec and sizes (what `m3jax kb info` prints)."""
        s = self.bank.summary()
        return {"directory": self.directory, "model": self.info.get("model"),
                "fingerprint": self.bank.fingerprint, "embedder": self.info.get("embedder"),
                "codec": s["codec"], "bytes_per_memory": s["bytes_per_memory"],
                "references": self.references, **_counts(self.records),
                "bank_bytes": self.references * (s["bytes_per_memory"] + s["metadata_bytes_per_memory"])
                + s["codec_bytes"],
                "disk_bytes": _disk_bytes(self.directory), "index_method": self.index.method,
                "index_vectors": len(self.index),
                "pending_add": os.path.exists(os.path.join(self.directory, JOURNAL_FILE))}

    # ------------------------------------------------------------------ lookups
    def _check_ref_ids(self, reference_ids: Any) -> np.ndarray:
        a = np.asarray(reference_ids)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise KnowledgeBaseError(f"reference ids must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
        bad = (a < -1) | (a >= self.references)
        if np.any(bad):
            raise KnowledgeBaseError(f"reference ids {a[bad][:8].tolist()} are outside [0, {self.references}) "
                                     f"of knowledge base {self.directory!r}")
        return a

    def _record_index(self, ids: np.ndarray) -> np.ndarray:
        """Record index of each memory id (-1 for id -1)."""
        flat = ids.reshape(-1)
        pos = np.searchsorted(self._firsts, flat, side="right") - 1
        ok = (flat >= 0) & (pos >= 0)
        ok[ok] &= flat[ok] < self._ends[pos[ok]]
        if np.any((flat >= 0) & ~ok):
            raise KnowledgeBaseError(f"knowledge base {self.directory!r}: memories "
                                     f"{flat[(flat >= 0) & ~ok][:8].tolist()} belong to no document record")
        out = np.full(flat.shape, -1, np.int64)
        out[ok] = self._rec_of[pos[ok]]
        return out.reshape(ids.shape)

    def is_deleted(self, reference_ids: Any) -> np.ndarray:
        """Bool mask (same shape): True for references of deleted documents (False for id -1)."""
        ids = np.asarray(reference_ids, np.int64)
        deleted = self._deleted
        out = np.zeros(ids.shape, bool)
        ok = (ids >= 0) & (ids < len(deleted))
        out[ok] = deleted[ids[ok]]
        return out

    def doc_ids(self, reference_ids: Any) -> np.ndarray:
        """The doc_id of each reference id (int64, same shape; -1 for id -1, e.g. a search's
        empty slot)."""
        rec = self._record_index(self._check_ref_ids(reference_ids))
        out = np.full(rec.shape, -1, np.int64)
        out[rec >= 0] = self._rec_doc[rec[rec >= 0]]
        return out

    def titles(self, reference_ids: Any) -> Any:
        """The title of the document of each reference id, as nested lists of the ids' shape
        (None for id -1 and for documents added without a title)."""
        rec = self._record_index(self._check_ref_ids(reference_ids))
        out = np.empty(rec.shape, object)
        flat = out.reshape(-1)
        for j, i in enumerate(rec.reshape(-1)):
            flat[j] = self.records[i].title if i >= 0 else None
        return out.tolist()

    # ------------------------------------------------------------------ reading
    def describe(self, reference_ids: Any, tokenizer, *, chars: int = 160) -> list[dict[str, Any]]:
        """What a user needs to see which text an answer read: for each distinct reference id (in
        first-seen order; -1 skipped), {"id", "doc_id", "title", "snippet"}, the snippet being the
        first `chars` characters of the reference's text (decoded from its stored tokens)."""
        flat = [int(i) for i in np.asarray(reference_ids).reshape(-1) if int(i) >= 0]
        ids = np.asarray(list(dict.fromkeys(flat)), np.int64)
        if not len(ids):
            return []
        docs, titles = self.doc_ids(ids), self.titles(ids)
        meta = self.bank.metadata(ids)
        out = []
        for j, rid in enumerate(ids):
            text = " ".join(tokenizer.decode(meta.tokens[j, : meta.lengths[j]].tolist()).split())
            out.append({"id": int(rid), "doc_id": int(docs[j]), "title": titles[j],
                        "snippet": text if len(text) <= chars else text[: chars - 3].rstrip() + "..."})
        return out

    def retriever(self, embedder: Embedder | None = None, *, tokenizer=None, k: int | None = None,
                  threshold: float = EVAL_THRESHOLD, cache_size: int = 4096) -> Retriever:
        """A Retriever over the committed references that never returns a deleted one."""
        embedder = embedder if embedder is not None else default_embedder(self.info.get("embedder"))
        meta = self.bank.metadata(np.arange(self.references))
        refs = [meta.tokens[i, : meta.lengths[i]].tolist() for i in range(len(meta))]
        k = self.bank.config.memories_per_chunk if k is None else k
        return Retriever(self.index, embedder, reference_tokens=refs, bank=self.bank, tokenizer=tokenizer,
                         k=k, threshold=threshold, cache_size=cache_size, exclude=self.is_deleted)

    # ------------------------------------------------------------------ updates
    def refresh(self) -> None:
        """Re-read the committed state from disk: what another process (or an update of this
        object that failed part way) committed. `add` and `delete` start with it; a long-lived
        reader (a server) calls it to see other processes' updates."""
        info = _read_info(self.directory)
        refs = int(info.get("references", len(self.index)))
        if refs != self.references or info.get("index_dir", INDEX_DIR) != self.info.get("index_dir", INDEX_DIR):
            self.index = VectorIndex.load(os.path.join(self.directory, info.get("index_dir", INDEX_DIR)))
        self.bank.refresh()
        self.records = _load_records(self.directory, refs, self.bank)
        self.info = {**info, **_counts(self.records)}
        self._reindex()

    def add(self, documents: Iterable[Any], params, config: ModelConfig, tokenizer, *,
            embedder: Embedder | None = None, batch_size: int = 64, show_progress: bool = True,
            log=print) -> list[DocumentRecord]:
        """Add documents ((doc_id, text) or (doc_id, text, title)) without rebuilding: their
        memories are written by `params` (the weights that wrote the bank, else
        BankFingerprintError), appended to the bank and indexed. Resumable (see the module
        docstring). A doc_id already live here is refused (KnowledgeBaseError); a deleted one is
        added again under new memory ids. Returns the new documents' records."""
        docs = _normalize_documents(documents, f"knowledge base {self.directory!r}")
        self.refresh()
        new = _ingest(self.directory, self, docs, params, config, tokenizer, embedder=embedder,
                      embedder_name=self.info.get("embedder", "minilm"), codec=self.bank.codec,
                      index_method="auto", batch_size=batch_size, show_progress=show_progress, log=log)
        self.index, self.info, self.records = new.index, new.info, new.records
        self.bank.refresh()
        self._reindex()
        given = {d for d, _, _ in docs}
        return [r for r in self.records if r.doc_id in given and not r.deleted]

    def delete(self, doc_ids: int | Iterable[int]) -> int:
        """Delete documents by doc_id: retrieval never returns their references again (durable:
        documents.jsonl is rewritten atomically). Unknown or already deleted doc ids raise
        KnowledgeBaseError and nothing is deleted. Returns the number of references deleted."""
        where = f"knowledge base {self.directory!r}"
        if isinstance(doc_ids, (int, np.integer)):
            doc_ids = [doc_ids]
        want = list(dict.fromkeys(_doc_id(d, where) for d in doc_ids))
        if not want:
            raise KnowledgeBaseError(f"{where}: no doc ids to delete")
        self.refresh()
        live = {r.doc_id for r in self.records if not r.deleted}
        for d in want:
            if d not in live:
                gone = any(r.doc_id == d for r in self.records)
                raise KnowledgeBaseError(f"doc_id {d} was already deleted from {where}" if gone
                                         else f"doc_id {d} is not in {where}")
        drop = set(want)
        records = [dataclasses.replace(r, deleted=True) if r.doc_id in drop and not r.deleted else r
                   for r in self.records]
        _write_documents(self.directory, records)  # the durable point
        info = dict(self.info)
        info.update(_counts(records), updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _write_info(self.directory, info)
        n = sum(r.count for r in self.records if r.doc_id in drop and not r.deleted)
        self.records, self.info = records, info
        self._reindex()
        return n


# ---------------------------------------------------------------------- build / add / open
def _ingest(directory: str, state: KnowledgeBase | None, documents: Iterable[Any], params,
            config: ModelConfig, tokenizer, *, embedder: Embedder | None, embedder_name: str, codec: Any,
            index_method: str, batch_size: int, show_progress: bool, log) -> KnowledgeBase:
    """The one add path (the initial build is an add to an empty base, state None): see the module
    docstring for the steps and why a kill anywhere resumes to exactly one copy."""
    t0 = time.perf_counter()
    where = f"knowledge base {directory!r}"
    docs = _normalize_documents(documents, where)
    if not docs:
        raise KnowledgeBaseError(f"{where}: no documents to add")
    base = state.references if state is not None else 0
    fingerprint = params_fingerprint(params)
    bank_path = os.path.join(directory, BANK_DIR)
    embedder = embedder if embedder is not None else default_embedder(embedder_name)
    if state is not None:
        MemoryBank.open(bank_path, config, fingerprint, check="none")  # other config / weights: refused
        if embedder.dim != state.index.dim:
            raise KnowledgeBaseError(f"{where}: its index holds {state.index.dim}-dim vectors but the embedder "
                                     f"gives {embedder.dim}: use the embedder it was built with "
                                     f"({state.info.get('embedder')!r})")
    refs: list[Reference] = split_references([(d, t) for d, t, _ in docs], tokenizer,
                                             max_tokens=config.reference_len)
    if not refs:
        raise KnowledgeBaseError(f"{where}: no references: the documents are empty")
    n = len(refs)
    counts: dict[int, int] = {}
    for r in refs:
        counts[r.doc_id] = counts.get(r.doc_id, 0) + 1
    new_records, first = [], base
    for doc_id, text, title in docs:
        new_records.append(DocumentRecord(doc_id, first, counts.get(doc_id, 0), title, sha256=_text_digest(text)))
        first += counts.get(doc_id, 0)
    digest = _digest(docs, refs)

    journal = _read_journal(directory)
    if state is not None and _finish_committed_add(state, journal):
        if journal["digest"] == digest:
            log(f"  the add of these {len(docs)} documents was already committed")
            return state
        journal = None
    if journal is not None:
        if journal["digest"] != digest:
            raise KnowledgeBaseError(
                f"{where}: an unfinished add of {journal.get('documents', '?')} documents (doc ids "
                f"{_preview(journal.get('doc_ids', []))}) is pending ({JOURNAL_FILE}): run it again with the same "
                f"documents to finish it before adding others")
        if journal["base"] != base:
            raise KnowledgeBaseError(f"{where}: {JOURNAL_FILE} appends at memory {journal['base']} but "
                                     f"{INFO_FILE} commits {base} memories: the knowledge base changed while an "
                                     f"add was pending")
        log(f"  resuming the unfinished add of {len(docs)} documents at memory {base}")
    else:
        if state is not None:
            live = {r.doc_id for r in state.records if not r.deleted}
            dup = [d for d, _, _ in docs if d in live]
            if dup:
                raise KnowledgeBaseError(f"doc_id {dup[0]} is already in {where}"
                                         + (f" (and {len(dup) - 1} more given)" if len(dup) > 1 else "")
                                         + ": delete it first to replace it")
        os.makedirs(directory, exist_ok=True)
        _write_atomic(os.path.join(directory, JOURNAL_FILE), json.dumps(
            {"format": _JOURNAL_FORMAT, "base": base, "references": n, "documents": len(docs),
             "digest": digest, "doc_ids": [d for d, _, _ in docs[:20]]}) + "\n")
    log(f"  {len(docs)} documents -> {n} references of <= {config.reference_len} tokens (memories "
        f"{base}..{base + n - 1})")

    bank = build_bank(bank_path, config, fingerprint, refs, make_encode_fn(params, config), codec=codec,
                      batch_size=batch_size, show_progress=show_progress, first_id=base)
    if len(bank) != base + n:
        raise KnowledgeBaseError(f"{where}: the bank holds {len(bank)} memories after the add, expected "
                                 f"{base + n}")
    texts = {d: t for d, t, _ in docs}
    ref_texts = [texts[r.doc_id][r.char_start:r.char_end] for r in refs]
    emb_file = EMBEDDINGS_FILE if base == 0 else PENDING_EMBEDDINGS_FILE
    vecs = embed_cached(ref_texts, embedder, os.path.join(directory, emb_file), show_progress=show_progress)
    ids = np.arange(base, base + n, dtype=np.int64)
    if state is None:
        index_name = INDEX_DIR
        index = None
        if os.path.exists(os.path.join(directory, INDEX_DIR, "index.json")):
            try:  # e.g. made by the demo's pairing; reused only if built from these very vectors
                index = VectorIndex.load(os.path.join(directory, INDEX_DIR))
            except (ValueError, OSError) as e:
                log(f"  rebuilding the index: the one in {directory!r} is unreadable ({e})")
            if index is not None and (index.source != source_of(vecs, ids)
                                      or index_method not in ("auto", index.method)):
                index = None
        if index is None:
            index = VectorIndex.build(vecs, ids, method=index_method)
            _save_index(index, os.path.join(directory, INDEX_DIR))
    else:
        index_name = f"{INDEX_DIR}-{base + n}"
        index = VectorIndex.load(os.path.join(directory, state.info.get("index_dir", INDEX_DIR)))
        index.add(vecs, ids)  # a fresh copy: the committed index on disk (and in memory) is untouched
        _save_index(index, os.path.join(directory, index_name))
        _merge_embeddings(directory, base, vecs, embeddings_key(ref_texts, embedder))

    records = (_load_records(directory, base, state.bank) if state is not None else []) + new_records
    _write_documents(directory, records)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if state is None:
        info: dict[str, Any] = {"format": KB_FORMAT, "model": config.name, "fingerprint": fingerprint,
                                "embedder": embedder_name, "dim": int(vecs.shape[1]), "codec": bank.codec.name,
                                "created": now}
    else:
        info = dict(state.info)
    info.update(references=base + n, **_counts(records), index_method=index.method, index_dir=index_name,
                bank=bank.summary(), updated=now)
    info["build_s" if state is None else "last_add_s"] = round(time.perf_counter() - t0, 2)
    _write_info(directory, info)  # the commit point
    _cleanup(directory, info)
    read_bank = state.bank if state is not None else bank
    return KnowledgeBase(directory, read_bank, index, info, records)


def _finish_committed_add(kb: KnowledgeBase, journal: dict[str, Any] | None) -> bool:
    """If `journal` is that of an add that kb.json already committed (killed during its clean-up),
    finish the clean-up and return True."""
    if journal is None or int(journal["base"]) + int(journal["references"]) != kb.references:
        return False
    _cleanup(kb.directory, kb.info)
    return True


def _save_index(index: VectorIndex, path: str) -> None:
    """Save into a clean directory (a killed earlier save may have left other files there)."""
    if os.path.exists(path):
        shutil.rmtree(path)
    index.save(path)


def _cleanup(directory: str, info: dict[str, Any]) -> None:
    """After a commit: remove indexes other than the committed one, the pending embeddings, and
    last the journal."""
    keep = info.get("index_dir", INDEX_DIR)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if _INDEX_NAME.match(name) and name != keep and os.path.isdir(path):
            shutil.rmtree(path)
    for name in (PENDING_EMBEDDINGS_FILE, PENDING_EMBEDDINGS_FILE + ".partial.npy", PENDING_EMBEDDINGS_FILE + ".json"):
        if os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    if os.path.exists(os.path.join(directory, JOURNAL_FILE)):
        os.remove(os.path.join(directory, JOURNAL_FILE))


def build_knowledge_base(directory: str, params, config: ModelConfig, tokenizer,
                         documents: Sequence[Any], *, embedder: Embedder | None = None,
                         embedder_name: str = "minilm", codec: str = "bf16", index_method: str = "auto",
                         batch_size: int = 64, show_progress: bool = True, log=print) -> KnowledgeBase:
    """Split documents into references, encode them into a bank with `params`, embed and index.

    documents: (doc_id, text) or (doc_id, text, title) with unique integer doc ids. Resumes a
    partial build in `directory`. On a knowledge base already built there, adds the documents
    whose doc ids it has never held (deleted ones stay deleted) and returns it; a live doc_id
    given with another text than the one it holds raises KnowledgeBaseError (another corpus).
    index_method: "auto", "exact" or "scann" (see VectorIndex.build).
    """
    if os.path.exists(os.path.join(directory, INFO_FILE)):
        kb = open_knowledge_base(directory, config, params)
        _finish_committed_add(kb, _read_journal(directory))
        name = getattr(codec, "name", codec)
        if name != kb.bank.codec.name:
            raise KnowledgeBaseError(f"knowledge base {directory!r} stores codec {kb.bank.codec.name!r}, not "
                                     f"{name!r}: build into another directory")
        known = {r.doc_id: r for r in kb.records}
        docs = _normalize_documents(documents, f"knowledge base {directory!r}")
        changed = [d for d, text, _ in docs if d in known and not known[d].deleted and known[d].sha256 is not None
                   and known[d].sha256 != _text_digest(text)]
        if changed:
            raise KnowledgeBaseError(
                f"knowledge base {directory!r} already holds doc_id {changed[0]} with another text"
                + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
                + ": it was built from another corpus; build into a new directory, or replace the documents "
                  "(`m3jax kb delete`, then `m3jax kb add`)")
        new = [d for d in docs if d[0] not in known]
        if new:
            kb.add(new, params, config, tokenizer, embedder=embedder, batch_size=batch_size,
                   show_progress=show_progress, log=log)
        return kb
    return _ingest(directory, None, documents, params, config, tokenizer, embedder=embedder,
                   embedder_name=embedder_name, codec=codec, index_method=index_method,
                   batch_size=batch_size, show_progress=show_progress, log=log)


def open_knowledge_base(directory: str, config: ModelConfig | None = None, params=None) -> KnowledgeBase:
    """Open a knowledge base; with `params` the bank refuses memories written by other weights."""
    info = _read_info(directory)
    fingerprint = params_fingerprint(params) if params is not None else None
    bank = MemoryBank.open(os.path.join(directory, BANK_DIR), config, fingerprint)
    committed = int(info.get("references", len(bank)))
    index = VectorIndex.load(os.path.join(directory, info.get("index_dir", INDEX_DIR)))
    if len(index) != committed or len(bank) < committed:
        raise KnowledgeBaseError(f"knowledge base {directory!r}: {INFO_FILE} commits {committed} references but "
                                 f"the index holds {len(index)} vectors and the bank {len(bank)} memories: "
                                 f"rebuild it")
    records = _load_records(directory, committed, bank)
    info = {**info, **_counts(records)}
    return KnowledgeBase(directory, bank, index, info, records)
