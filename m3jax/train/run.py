"""`m3jax train`: one command for both training stages, on one host or on every host of a pod.

    m3jax train --stage warmup --preset demo --out runs/warmup                 # from scratch
    m3jax train --stage continual --model runs/warmup --out runs/continual      # + memory
    m3jax train --stage continual --model smollm2 --corpus docs.jsonl --out runs/smol

What one run does (every step is cached on disk, so the same command run again after a kill
resumes where it stopped and ends with the params of an uninterrupted run):

  1. model: `--preset` (random init; the tokenizer is `--tokenizer DIR` or a byte-level BPE
     trained on the training split into `OUT/tokenizer`) or `--model DIR` (a model directory:
     `m3jax convert --out` or a previous `m3jax train` run, whose `OUT/model` is taken), with
     `--set key=value` ModelConfig overrides.
  2. data (`m3jax.train.data`): the corpus (`--corpus FILE.jsonl`, default the shipped Wikipedia
     leads, `--limit N` of them) prepared as the TFDS array_record dataset in `--data-dir`
     (default `OUT/data`), tokenized once (cached by tokenizer), packed into rows of `--seq-len`;
     the held-out split never enters training.
  3. continual stage only (`continual_data`): the references of the corpus (train and held-out
     documents), MiniLM embeddings, a vector index, and one reference per 64-token chunk of
     every row (leakage filter 0.9), `m3jax.train.pairs.pair_corpus`, cached beside the data
     under a key of the rows, the tokenizer and the corpus. The result is a `PairedRows`:
     rows {"tokens", "loss_mask", "ref_ids"} + the references' token ids; more sources can be
     concatenated to it (`PairedRows.concat`) before training. Expert overrides: `--pairs
     PAIRS.npy` (reference ids of the rows, made elsewhere) and `--bank URL` (the ids then index
     that memory bank, whose reference tokens are read batch by batch).
     With `--recipe reading` (for a pretrained model, `m3jax.train.recipe`) the rows are instead
     one-chunk rows that each read `memories` references, as at inference: invented-fact probes
     and reconstructions, description -> title items and text of the training documents with
     their nearest neighbours (`--mix key=value` sets `ReadingMix` fields; `--seq-len` is then
     the model's chunk_size). Combine it with LoRA (`--train-set lora_rank=16`) to train a small
     part of the model: `OUT/model` then holds the adapter and names its base (`--model`).
  4. `m3jax.train.loop.train`: Orbax checkpoints in `OUT/checkpoints` (data iterator state
     included), `OUT/metrics.jsonl`, `OUT/loss.png`, TensorBoard events in `OUT/tb`.
  5. `OUT/model`: config.json + params.safetensors + tokenizer/ (`m3jax.convert`), written to a
     temporary directory and renamed, read by `m3jax generate/eval/build-memory --model`.

Multi-host: the same command on every host. `init_distributed` (before any JAX computation)
joins the hosts (`m3jax.distributed.maybe_initialize_distributed`: TPU pod / SLURM / Open MPI
environment, `JAX_COORDINATOR_ADDRESS`, `M3JAX_DISTRIBUTED=1`, or `--coordinator`
`--num-processes` `--process-id`). Process 0 prepares (data, tokenizer, pairs) while the others
wait at a barrier, then every process reads the caches; each host reads its own shard of the
rows (`DataConfig` shard = process index) and feeds process-local batches of
`batch_size / processes` rows (the train step assembles the global batch). `OUT` must be a
path every host sees (a shared filesystem, e.g. a bucket mounted with gcsfuse); `--data-dir`
may be a `gs://` TFDS data dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from m3jax import sharding as S
from m3jax.assets import wiki_leads
from m3jax.config import MeshConfig, TrainConfig, apply_overrides, preset
from m3jax.convert import ConvertError, load_checkpoint_dir, save_adapter_dir, save_checkpoint_dir
from m3jax.convert import model_dir as find_model_dir
from m3jax.memory.references import split_references
from m3jax.model import check_params, restack
from m3jax.distributed import maybe_initialize_distributed
from m3jax.tokenizer import Tokenizer
from m3jax.train.pairs import PairedRows, pair_corpus, pairs_key
from m3jax.train.recipe import ReadingMix, describe, reading_rows

STAGES = ("warmup", "continual")
RECIPES = ("paper", "reading")
DEFAULT_LR = {"warmup": 3e-3, "continual": 1e-3}


class TrainError(ValueError):
    """A training run cannot start as asked; the message says why (one line)."""


@dataclass(frozen=True)
class TrainRun:
    """The settings of one `m3jax train` run (the command's flags)."""

    stage: str
    out: str
    preset: str | None = None  # from scratch (random init)
    init: str | None = None  # a model dir, or a run dir holding model/
    tokenizer: str | None = None  # with preset: a tokenizer dir (default: train one on the corpus)
    corpus: str | None = None  # JSONL (None: the shipped Wikipedia leads)
    limit: int = 0  # the first N shipped leads (0: all)
    data_dir: str | None = None  # TFDS data dir (default OUT/data)
    tfds_name: str | None = None  # an already prepared array_record dataset in data_dir
    steps: int = 100
    batch_size: int = 8  # global (all hosts)
    seq_len: int = 256
    lr: float | None = None  # None: DEFAULT_LR[stage]
    model_set: tuple[str, ...] = ()  # ModelConfig key=value overrides
    train_set: tuple[str, ...] = ()  # TrainConfig key=value overrides
    mesh: tuple[int, int, int] = (1, -1, 1)
    devices: int | None = None  # the first N devices (one process only)
    seed: int = 0
    progress: bool = True
    pairs: str | None = None  # continual, expert: reference ids [rows, chunks] (.npy)
    bank: str | None = None  # continual, expert: the memory bank the pairs' ids index
    recipe: str = "paper"  # continual data: "paper" (pairs of the corpus) or "reading" (m3jax.train.recipe)
    mix: tuple[str, ...] = ()  # ReadingMix key=value overrides (recipe "reading")


# ------------------------------------------------------------------------------ paths, hosts
def is_url(path: str) -> bool:
    return "://" in str(path)


def local_path(path: str | None, what: str, *, allow_gcs: bool = False) -> str | None:
    """`file://` URLs become paths; other URLs pass when `allow_gcs` (gs:// only), else raise."""
    if path is None:
        return None
    path = str(path)
    if path.startswith("file://"):
        return path[len("file://"):]
    if is_url(path):
        if allow_gcs and path.startswith("gs://"):
            return path
        raise TrainError(
            f"{what} {path!r}: the training loop writes {what} through the local filesystem; mount the "
            "bucket on every host (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/gcs`) and pass the mounted path")
    return path


def read_bytes(path: str) -> bytes:
    """Bytes of a local path, `file://` or any URL `etils.epath` reads (gs:// with gcsfs)."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_url(path):
        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def load_pairs(path: str) -> np.ndarray:
    """Reference ids int32 [rows, chunks] from an .npy file (path or URL)."""
    ids = np.load(io.BytesIO(read_bytes(path)))
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise TrainError(f"--pairs {path!r}: expected integer reference ids [rows, chunks], got "
                         f"{ids.dtype}{list(ids.shape)}")
    return ids.astype(np.int32)


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """`maybe_initialize_distributed`, forced when any argument is given. Call it before any
    JAX computation."""
    kwargs: dict[str, Any] = {}
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    return maybe_initialize_distributed(force=True if kwargs else None, **kwargs)


def barrier(name: str) -> None:
    """Wait until every process got here (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def first_on_process_0(name: str, fn: Callable[[], Any]) -> Any:
    """Process 0 runs `fn` (which prepares caches), the others wait for it and then run `fn`
    too, which then reads what process 0 wrote."""
    if jax.process_index() == 0:
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()


# ------------------------------------------------------------------------------ model source
def resolve_model_dir(path: str) -> str:
    """The model directory of `--model` / `--init` (`m3jax.convert.model_dir`: a model dir, a run
    dir holding `model/`, or a shipped model's name), as an absolute path."""
    try:
        return os.path.abspath(find_model_dir(local_path(path, "--model")))
    except ConvertError as e:
        raise TrainError(f"--model {e}") from None


def checkpoint_stage(out: str) -> tuple[int, str] | None:
    """(step, stage) of the latest checkpoint in `out/checkpoints`, or None."""
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d) or not any(n.isdigit() for n in os.listdir(d)):
        return None
    from m3jax.train.checkpoint import read_meta  # local: orbax (seconds to import), for training only

    meta = read_meta(out)
    return int(meta["step"]), str(meta.get("stage"))


def _check_spec(spec: TrainRun) -> None:
    if spec.stage not in STAGES:
        raise TrainError(f"--stage must be one of {STAGES}, got {spec.stage!r}")
    if (spec.preset is None) == (spec.init is None):
        raise TrainError("give the model: --preset NAME (from scratch) or --model DIR (a model directory), "
                         "one of them")
    if spec.init is not None and spec.tokenizer is not None:
        raise TrainError("--tokenizer goes with --preset; a model from --model brings its own tokenizer/")
    if spec.stage == "continual" and spec.init is None:
        raise TrainError("the continual stage starts from trained weights: give --model (the --out of a "
                         "`m3jax train --stage warmup` run, or a model directory from `m3jax convert`)")
    if spec.stage == "warmup" and (spec.pairs or spec.bank):
        raise TrainError("--pairs and --bank belong to the continual stage")
    if spec.recipe not in RECIPES:
        raise TrainError(f"--recipe must be one of {RECIPES}, got {spec.recipe!r}")
    if spec.recipe == "reading" and (spec.stage != "continual" or spec.pairs or spec.bank):
        raise TrainError("--recipe reading is a continual-stage recipe with its own references (no --pairs/--bank)")
    if spec.mix and spec.recipe != "reading":
        raise TrainError("--mix sets the rows of --recipe reading")
    if spec.bank and not spec.pairs:
        raise TrainError("--bank gives the references of the ids in --pairs: give --pairs too (without "
                         "both, the command pairs the corpus with its own references)")
    if spec.corpus is not None and spec.limit:
        raise TrainError("--limit takes the first N shipped Wikipedia leads; with --corpus, cut the file instead")
    if spec.corpus is not None and spec.tfds_name is not None:
        raise TrainError("--corpus and --tfds-name are two data sources: give one")
    if spec.corpus is not None and not os.path.isfile(spec.corpus):
        raise TrainError(f"--corpus {spec.corpus}: no such file")
    if spec.devices is not None and spec.devices < 1:
        raise TrainError(f"--devices must be >= 1, got {spec.devices}")
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(spec, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")


def train_config(spec: TrainRun):
    """The TrainConfig of `spec`: its flags, then `--train-set` overrides (any field; `mesh`
    as data,fsdp,tensor). The run follows the result (an overridden seq_len, batch_size or seed
    is the data pipeline's too)."""
    tc = TrainConfig(stage=spec.stage, seq_len=spec.seq_len, batch_size=spec.batch_size, steps=spec.steps,
                     lr=spec.lr if spec.lr is not None else DEFAULT_LR[spec.stage],
                     warmup_steps=min(spec.steps, max(1, spec.steps // 20)), seed=spec.seed,
                     mesh=MeshConfig(*spec.mesh))
    rest = []
    for item in spec.train_set:
        k, _, v = item.partition("=")
        if k.strip() == "mesh":
            tc = dataclasses.replace(tc, mesh=MeshConfig(*parse_mesh(v)))
        else:
            rest.append(item)
    return apply_overrides(tc, rest)


def parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise TrainError(f"mesh {text!r}: give data,fsdp,tensor sizes, e.g. 1,-1,1 (one may be -1)")
    return sizes  # type: ignore[return-value]


# ------------------------------------------------------------------------------ data
def _write_leads(path: str, limit: int) -> None:
    """The first `limit` shipped Wikipedia leads as a JSONL corpus (atomically)."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for a in wiki_leads()[:limit]:
            f.write(json.dumps({"doc_id": a.doc_id, "title": a.title, "text": a.text,
                                "description": a.description, "topic": a.topic}) + "\n")
    os.replace(tmp, path)


def _prepare(dcfg) -> str:
    from m3jax.train import data as D  # local: TFDS and grain (seconds to import), for training only

    try:
        return D.prepare(dcfg)
    except (ValueError, FileNotFoundError) as e:  # a bad JSONL line (file:line), a missing file
        raise TrainError(str(e).splitlines()[0] if str(e) else repr(e)) from e


def _pairs_cache_dir(dcfg, out: str) -> str:
    """Beside the data (`data_dir/m3jax_pairs`), or in the run dir when the data dir is a URL."""
    if dcfg.data_dir is not None and not is_url(dcfg.data_dir):
        return os.path.join(dcfg.data_dir, "m3jax_pairs")
    return os.path.join(out, "pairs")


def continual_data(dcfg, tokenizer, model_cfg, *, cache_dir: str, pairs: str | None = None,
                   bank: str | None = None, embedder=None, embedder_name: str = "minilm",
                   show_progress: bool = True):
    """The continual stage's training data from the corpus of `dcfg`: a `PairedRows` of the
    packed training rows {"tokens", "loss_mask", "ref_ids"} and the references' token ids.

    The references are those of the whole corpus (train and held-out documents, as a knowledge
    base would hold them); `m3jax.train.pairs.pair_corpus` pairs each chunk with one of them,
    caching embeddings and pairs in `cache_dir` under keys of the corpus, the tokenizer, the
    rows and the pairing settings (a changed corpus is paired anew). `pairs` (a .npy of ids
    [rows, chunks]) replaces the pairing; with `bank` those ids index that memory bank.
    Concatenate more sources with `PairedRows.concat` before training.
    """
    from m3jax.train import data as D  # local: TFDS and grain (seconds to import), for training only

    stream = D.token_stream(dcfg, tokenizer, dcfg.split)
    packed = D.pack_rows(stream, dcfg.seq_len, tokenizer.pad_id, dcfg.pack)
    rows = {"tokens": packed["tokens"], "loss_mask": packed["loss_mask"]}
    n, T = rows["tokens"].shape
    C = -(-T // model_cfg.chunk_size)
    splits = D.SPLITS if dcfg.tfds_name is None else (dcfg.split,)
    if pairs is not None:
        ids = load_pairs(pairs)
        if ids.shape != (n, C):
            raise TrainError(f"--pairs {pairs!r} of shape {ids.shape} does not fit the {n} packed rows of {T} "
                             f"tokens ({C} chunks of {model_cfg.chunk_size}): pair these rows (same data, "
                             "tokenizer, seq_len)")
        rows["ref_ids"] = ids
        if bank is not None:
            return PairedRows(rows, None, bank=bank if is_url(bank) else os.path.abspath(bank))
        refs = split_references(D.read_documents(dcfg, splits), tokenizer, max_tokens=model_cfg.reference_len)
        return PairedRows(rows, [list(r.tokens) for r in refs])
    corpus_id = D.prepare(dcfg)
    tok_id = D.tokenizer_fingerprint(tokenizer)
    emb_key = hashlib.sha256(f"{corpus_id}|{','.join(splits)}|{tok_id}|{model_cfg.reference_len}|"
                             f"{embedder_name}".encode()).hexdigest()[:16]
    key = pairs_key(rows["tokens"], emb_key, str(rows["tokens"].shape), str(model_cfg.chunk_size))
    got = pair_corpus(D.read_documents(dcfg, splits), rows, tokenizer, reference_len=model_cfg.reference_len,
                      chunk_size=model_cfg.chunk_size, pairs_path=os.path.join(cache_dir, f"pairs-{key}.npy"),
                      embeddings_path=os.path.join(cache_dir, f"embeddings-{emb_key}.npy"), embedder=embedder,
                      show_progress=show_progress)
    rows["ref_ids"] = got.ids
    return PairedRows(rows, got.reference_tokens)


def _iterator(rows: dict[str, np.ndarray], dcfg, blocks: bool = False):
    import grain  # local: grain and TFDS (seconds to import), for training only

    from m3jax.train import data as D

    index, count = dcfg.shard()
    ds = D.rows_dataset(rows, batch_size=dcfg.batch_size // count, shuffle=dcfg.shuffle, seed=dcfg.seed,
                        num_epochs=dcfg.num_epochs, shard_index=index, shard_count=count, blocks=blocks)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()


# ------------------------------------------------------------------------------ model dir
def host_params(params):
    """The whole params on this host as numpy (gathered from every process when several)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def save_model_dir(directory: str, config, params, tokenizer) -> None:
    """`convert.save_checkpoint_dir`, atomically: written beside `directory`, then renamed over
    it, so that a kill never leaves a half-written model directory."""
    directory = os.path.abspath(directory)
    tmp, old = directory + ".partial", directory + ".old"
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    save_checkpoint_dir(tmp, config, params, tokenizer)
    if os.path.exists(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ the run
def _print(msg: str) -> None:
    print(msg, flush=True)


def run(spec: TrainRun, *, embedder=None, log: Callable[[str], None] = _print) -> dict[str, Any]:
    """Run (or resume) `spec`; returns the summary that `m3jax train` prints. Call
    `init_distributed` first when several hosts run it. `embedder`: the sentence encoder of the
    continual stage's pairing (default MiniLM)."""
    # local: TFDS, grain and orbax (seconds to import), for training only
    from m3jax.train import data as D
    from m3jax.train.loop import train

    t_start = time.perf_counter()
    _check_spec(spec)
    tc = train_config(spec)
    spec = dataclasses.replace(spec, stage=tc.stage, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed)
    _check_spec(spec)
    index, count = jax.process_index(), jax.process_count()
    say = log if index == 0 else (lambda msg: None)
    progress = spec.progress and index == 0
    if not progress:
        import tensorflow_datasets as tfds  # local: seconds to import

        tfds.disable_progress_bar()
    out = os.path.abspath(local_path(spec.out, "--out"))
    if spec.devices is not None and count > 1:
        raise TrainError("--devices picks devices of one process; with several hosts set --mesh instead")
    if spec.batch_size % count:
        raise TrainError(f"--batch-size {spec.batch_size} (global) is not a multiple of the {count} processes")
    done = checkpoint_stage(out)
    if done is not None and done[1] != spec.stage:
        raise TrainError(f"{out} holds a {done[1]} run (checkpoint of step {done[0]}), not {spec.stage}: a new "
                         f"stage needs its own --out (with --model {spec.out})")

    # ------------------------------------------------------------ model and tokenizer
    model_dir = resolve_model_dir(spec.init) if spec.init is not None else None
    if model_dir is not None:
        base_cfg, _, init_tok = load_checkpoint_dir(model_dir, with_params=False)
        if init_tok is None:
            raise TrainError(f"--model {model_dir}: the model directory has no tokenizer/")
        model_cfg = apply_overrides(base_cfg, list(spec.model_set))
    else:
        init_tok = None
        model_cfg = apply_overrides(preset(spec.preset), list(spec.model_set))

    # ------------------------------------------------------------ data (process 0 first)
    data_dir = local_path(spec.data_dir, "--data-dir", allow_gcs=True) or os.path.join(out, "data")
    if not is_url(data_dir):
        data_dir = os.path.abspath(data_dir)
    corpus = os.path.abspath(spec.corpus) if spec.corpus else None
    if spec.limit:
        corpus = os.path.join(out, "data", f"wiki_leads_first{spec.limit}.jsonl")
    dcfg = D.DataConfig(data_dir=data_dir, corpus=corpus, tfds_name=spec.tfds_name, seq_len=spec.seq_len,
                        batch_size=spec.batch_size, seed=spec.seed, shard_index=index, shard_count=count)

    def prepare():
        if spec.limit:
            _write_leads(corpus, spec.limit)
        name = _prepare(dcfg)
        if init_tok is not None:
            tok = init_tok
        elif spec.tokenizer is not None:
            tok = Tokenizer.load(spec.tokenizer)
        else:
            tok = D.prepare_tokenizer(lambda: [t for _, t in D.read_documents(dcfg, ("train",))],
                                      os.path.join(out, "tokenizer"), vocab_size=model_cfg.vocab_size)
        stream = D.token_stream(dcfg, tok, dcfg.split)
        paired = None
        if spec.recipe == "reading":
            mix = apply_overrides(ReadingMix(seed=spec.seed), list(spec.mix))
            cache = _pairs_cache_dir(dcfg, out)
            key = hashlib.sha256(json.dumps([dataclasses.asdict(mix), D.tokenizer_fingerprint(tok),
                                             model_cfg.reference_len]).encode()).hexdigest()[:12]
            paired = reading_rows(D.read_records(dcfg, ("train",)), tok, model_cfg, mix,
                                  batch_size=spec.batch_size,
                                  embeddings_path=os.path.join(cache, f"reading-{key}-embeddings.npy"),
                                  embedder=embedder, show_progress=progress)
        elif spec.stage == "continual":
            paired = continual_data(dcfg, tok, model_cfg, cache_dir=_pairs_cache_dir(dcfg, out), pairs=spec.pairs,
                                    bank=spec.bank, embedder=embedder, show_progress=progress)
            # further training sources join here: paired = paired.concat(PairedRows(rows, references))
        return name, tok, stream, paired

    t0 = time.perf_counter()
    name, tok, stream, paired = first_on_process_0("m3jax train: data prepared", prepare)
    if model_dir is None:
        model_cfg = _with_tokenizer(model_cfg, tok)
    if paired is not None and spec.recipe == "reading":  # its rows are `chunks` examples of a chunk each
        tc = dataclasses.replace(tc, seq_len=int(paired.rows["tokens"].shape[1]))
        spec = dataclasses.replace(spec, seq_len=tc.seq_len)
    if spec.seq_len > model_cfg.max_len:
        raise TrainError(f"--seq-len {spec.seq_len} is longer than the model's max_len {model_cfg.max_len} "
                         "(--set max_len=...)")
    n_rows = -(-len(stream.tokens) // spec.seq_len)
    say(f"data: {name} in {data_dir}: {stream.num_docs} training documents, {len(stream.tokens):,} tokens, "
        f"{n_rows} rows of {spec.seq_len} ({time.perf_counter() - t0:.1f} s)")
    if paired is not None and spec.recipe == "reading":
        say(f"reading recipe: {describe(paired)}")
    elif paired is not None:
        ids = paired.rows["ref_ids"]
        refs = "bank " + paired.bank if paired.bank else f"{len(paired.reference_tokens)} references"
        say(f"pairs: {refs}; {float((ids >= 0).mean()):.1%} of {ids.size} chunks paired")

    # ------------------------------------------------------------ batches, init, train
    if spec.stage == "warmup":
        batches: Any = D.make_iterator(dcfg, tok, dcfg.split)
        reference_fn = None
    else:
        batches = _iterator(paired.rows, dcfg, blocks=spec.recipe == "reading")
        reference_fn = paired.reference_fn(model_cfg.reference_len, model_cfg.pad_id, model_cfg.vocab_size)
    devices = jax.devices()[: spec.devices] if spec.devices else None
    if devices is not None and len(devices) < spec.devices:
        raise TrainError(f"--devices {spec.devices}: this process has {len(jax.devices())} devices")
    mesh = S.make_mesh(tc.mesh, devices=devices)
    init_params = None
    if done is not None:
        say(f"resuming {spec.stage} from step {done[0]} of {os.path.join(out, 'checkpoints')}")
    if model_dir is not None and (done is None or tc.lora_rank):  # LoRA resumes onto its base
        init_params = _load_init_params(model_dir, model_cfg)
    say(f"model {model_cfg.name}: {model_cfg.num_params(embedding=True) / 1e6:.2f}M params"
        + (f" from {model_dir}" if model_dir else " (random init)")
        + f"; {spec.stage}: {tc.steps} steps of {tc.batch_size} x {tc.seq_len} tokens, lr {tc.lr}, "
          f"mesh {dict(mesh.shape)}, {count} process(es), {jax.device_count()} device(s)")
    params = train(model_cfg, tc, batches, out, init_params=init_params, reference_fn=reference_fn, mesh=mesh,
                   progress=progress)

    # ------------------------------------------------------------ the model directory
    model_out = os.path.join(out, "model")
    if tc.lora_rank:  # a light model dir: the adapter, and the base it applies to
        if index == 0:
            tmp = model_out + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter_dir(tmp, model_cfg, os.path.join(out, "adapter.safetensors"),
                             {"model": os.path.abspath(model_dir)}, tok)
            shutil.rmtree(model_out, ignore_errors=True)
            os.replace(tmp, model_out)
    else:
        host = host_params(params)
        if index == 0:
            save_model_dir(model_out, model_cfg, host, tok)
    barrier("m3jax train: model written")
    last = _last_record(os.path.join(out, "metrics.jsonl")) if index == 0 else None
    say(f"model: {model_out} (m3jax generate --model {model_out} ...)")
    return {"out": out, "model": model_out, "processes": count, "devices": jax.device_count(),
            "stage": spec.stage, "steps": tc.steps, "wall_s": round(time.perf_counter() - t_start, 2),
            "last": last}


def _with_tokenizer(cfg, tok):
    """A from-scratch model takes its vocabulary, special ids and reference prefix from `tok`."""
    return dataclasses.replace(cfg, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                               pad_id=tok.pad_id, reference_prefix=tok.reference_prefix())


def _load_init_params(model_dir: str, model_cfg):
    """The params of a model directory, in `model_cfg.param_dtype`."""
    saved_cfg, params, _ = load_checkpoint_dir(model_dir)
    if saved_cfg.memory_layers != model_cfg.memory_layers:  # --set memory_layers: the same layers
        params = restack(params, model_cfg.memory_layers)
    try:
        check_params(params, model_cfg)
    except ValueError as e:
        raise TrainError(f"--set changes the shape of the model of {model_dir}: {e}") from None
    dtype = jnp.dtype(model_cfg.param_dtype)
    return jax.tree.map(lambda x: x if x.dtype == dtype else np.asarray(x).astype(dtype), params)


def _last_record(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else None
