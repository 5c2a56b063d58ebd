"""Multi-host training: the same command on every host of a TPU pod (or GPU cluster).

    python -m m3jax.launch --preset demo --tokenizer TOK_DIR --data-dir DATA --corpus corpus.jsonl \
        --stage warmup --steps 1000 --global-batch 256 --seq-len 1024 --mesh 1,-1,1 --out RUN1
    python -m m3jax.launch --preset demo --tokenizer TOK_DIR --data-dir DATA --corpus corpus.jsonl \
        --stage continual --init-params RUN1 --bank gs://bucket/kb/bank --pairs PAIRS.npy \
        --steps 500 --global-batch 256 --seq-len 1024 --lr 3e-4 --out RUN2

What it does, on each host (process):
  1. `sharding.maybe_initialize_distributed()` first of all: `jax.distributed.initialize()` when
     the environment shows several hosts (TPU pod env vars, SLURM, Open MPI,
     JAX_COORDINATOR_ADDRESS), or when forced by `--coordinator/--num-processes/--process-id`
     or `M3JAX_DISTRIBUTED=1` (GCE TPU VMs, where hosts are found through the metadata server).
  2. Data: a `DataConfig` with `shard_index = jax.process_index()`, `shard_count =
     jax.process_count()`. Process 0 prepares the TFDS dataset (array_record) and its token cache
     in `--data-dir` (a local path, `file://` URL, or a `gs://` TFDS data dir, which needs
     `gcsfs`), the others wait at a barrier and then read. Each host reads only its rows:
     batches are process-local (`global_batch / process_count` rows) and `TrainStep` assembles
     the global batch (`jax.make_array_from_process_local_data`).
  3. Continual stage: one reference per chunk. `--pairs` holds the reference id of every chunk of
     every packed training row (`m3jax.train.pairs.load_or_pair`, int32 [rows, chunks], -1 =
     none) and `--bank` is the memory bank (TensorStore zarr3, any kvstore URL: `gs://`,
     `file://`, `memory://`, or a local path); each host reads the token ids of its own rows'
     references from the bank (`MemoryBank.metadata`), batch by batch.
  4. `m3jax.train.loop.train` on the global mesh `--mesh data,fsdp,tensor` (Orbax checkpoints
     under `--out/checkpoints`, written by all hosts together, restorable onto any mesh; metrics
     by process 0).

Storage: `--out` must be a path every host sees (a local path on one host, or a shared
filesystem such as a GCS bucket mounted with gcsfuse on every TPU VM). `train()` treats `out_dir`
as a local path (`os.path`), so a `gs://` URL is refused here with that advice; `file://` URLs
are accepted and stripped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

log = logging.getLogger("m3jax.launch")


# ------------------------------------------------------------------------------ paths
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
        raise ValueError(
            f"{what} {path!r}: the training loop writes {what} through the local filesystem; mount the "
            "bucket on every host (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/gcs`) and pass the mounted path")
    return path


def read_bytes(path: str) -> bytes:
    """Bytes of a local path, `file://` or any URL `etils.epath` reads (gs:// with gcsfs)."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_url(path):
        from etils import epath

        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def load_pairs(path: str) -> np.ndarray:
    import io

    ids = np.load(io.BytesIO(read_bytes(path)))
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"pairs {path!r}: expected integer reference ids [rows, chunks], got {ids.dtype}{list(ids.shape)}")
    return ids.astype(np.int32)


# ------------------------------------------------------------------------------ distributed
def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """`maybe_initialize_distributed`, forced when any of the arguments is given."""
    from m3jax.sharding import maybe_initialize_distributed

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
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_shard() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


# ------------------------------------------------------------------------------ references
def bank_reference_fn(bank_path: str, reference_len: int, pad_id: int, vocab_size: int | None = None
                      ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """A host function batch -> batch adding `ref_tokens` int32 [B, C, R] and `ref_mask` bool
    [B, C, R] for `batch["ref_ids"]` [B, C] (-1: no reference, all-False mask), reading the
    references' token ids from the memory bank at `bank_path` (TensorStore; any kvstore URL)."""
    from m3jax.memory.bank import MemoryBank

    bank = MemoryBank.open(bank_path)
    bc = bank.config
    if vocab_size is not None and bc.vocab_size != vocab_size:
        raise ValueError(f"memory bank {bank.url} was built for a vocab of {bc.vocab_size}, the model has "
                         f"{vocab_size}: its references were tokenized by another tokenizer")
    R = reference_len
    n = len(bank)

    def add(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["ref_ids"])
        if ids.size and ids.max() >= n:
            raise ValueError(f"reference id {int(ids.max())} is past the {n} memories of bank {bank.url}")
        valid = ids >= 0
        tokens = np.full(ids.shape + (R,), pad_id, np.int32)
        mask = np.zeros(ids.shape + (R,), bool)
        if valid.any():
            meta = bank.metadata(ids[valid])
            t = meta.tokens[:, :R]
            lengths = np.minimum(meta.lengths, R)
            tokens[valid, : t.shape[1]] = t
            mask[valid] = np.arange(R)[None, :] < lengths[:, None]
        out = dict(batch)
        out["ref_tokens"], out["ref_mask"] = tokens, mask
        return out

    add.bank = bank  # type: ignore[attr-defined]
    return add


# ------------------------------------------------------------------------------ data
def data_iterator(dcfg, tokenizer, model_cfg, train_cfg, *, split: str = "train", pairs: str | None = None):
    """(iterator of process-local batches, rows info). Process 0 prepares the dataset and the
    token cache first; the other processes wait, then read."""
    from m3jax.train import data as D

    index, count = dcfg.shard()
    if index == 0:
        D.prepare(dcfg)
        D.token_stream(dcfg, tokenizer, split)
    barrier("m3jax.launch: data prepared")
    if train_cfg.stage == "warmup":
        return D.make_iterator(dcfg, tokenizer, split), {}
    stream = D.token_stream(dcfg, tokenizer, split)
    rows = D.pack_rows(stream, dcfg.seq_len, tokenizer.pad_id, dcfg.pack)
    if pairs is None:
        raise ValueError("stage 'continual' needs --pairs: the reference id of every chunk of every packed row "
                         "(m3jax.train.pairs.load_or_pair over these rows)")
    ids = load_pairs(pairs)
    n, T = rows["tokens"].shape
    C = -(-T // model_cfg.chunk_size)
    if ids.shape != (n, C):
        raise ValueError(f"pairs {pairs!r} of shape {ids.shape} do not fit the {n} packed rows of {T} tokens "
                         f"({C} chunks of {model_cfg.chunk_size}): pair these rows (same data, tokenizer, "
                         "seq_len, pack)")
    rows = dict(rows, ref_ids=ids)
    import grain

    ds = D.rows_dataset(rows, batch_size=dcfg.batch_size // count, shuffle=dcfg.shuffle, seed=dcfg.seed,
                        num_epochs=dcfg.num_epochs, shard_index=index, shard_count=count)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()
    return it, {"rows": n, "chunks_with_reference": float((ids >= 0).mean())}


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m3jax.launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="demo", help="model preset (m3jax presets)")
    g.add_argument("--tokenizer", help="tokenizer directory (tokenizer.json); sets vocab, special ids and the "
                                       "reference prefix of the model")
    g.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override (repeatable)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", required=True, help="TFDS data dir: local path, file:// or gs:// URL")
    g.add_argument("--corpus", help="JSONL corpus to prepare into --data-dir (default: the shipped Wikipedia leads)")
    g.add_argument("--tfds-name", help="an already prepared array_record TFDS dataset in --data-dir")
    g.add_argument("--split", default="train")
    g.add_argument("--no-shuffle", action="store_true")
    g.add_argument("--pairs", help="continual stage: reference ids [rows, chunks] (.npy; path or URL)")
    g.add_argument("--bank", help="continual stage: memory bank holding the references (TensorStore URL or path)")
    g = p.add_argument_group("training")
    g.add_argument("--stage", choices=["warmup", "continual"], default="warmup")
    g.add_argument("--steps", type=int, default=100)
    g.add_argument("--global-batch", type=int, default=8, help="sequences per step over all hosts")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup-steps", type=int, default=None, help="LR warmup updates (default: steps // 20)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override (repeatable)")
    g.add_argument("--init-params", help="continual stage: the warmup run's --out (its latest params)")
    g.add_argument("--out", required=True, help="run directory (checkpoints, metrics); shared by all hosts")
    g.add_argument("--no-resume", action="store_true")
    g = p.add_argument_group("distributed (default: detected from the environment)")
    g.add_argument("--coordinator", help="host:port of process 0's coordinator")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    init_distributed(args.coordinator, args.num_processes, args.process_id)  # before any JAX computation

    import jax

    from m3jax.config import MeshConfig, TrainConfig, apply_overrides, preset
    from m3jax.tokenizer import Tokenizer
    from m3jax.train import data as D
    from m3jax.train.loop import train

    index, count = host_shard()
    logging.basicConfig(level=logging.INFO if index == 0 else logging.WARNING,
                        format=f"[host {index}/{count}] %(asctime)s %(name)s: %(message)s")
    out = local_path(args.out, "--out")
    data_dir = local_path(args.data_dir, "--data-dir", allow_gcs=True)
    tok_dir = local_path(args.tokenizer, "--tokenizer")

    if tok_dir is None:
        raise SystemExit("--tokenizer is required (the data pipeline tokenizes the corpus with it)")
    tok = Tokenizer.load(tok_dir)
    model_cfg = dataclasses.replace(preset(args.preset), vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                                    eos_id=tok.eos_id, pad_id=tok.pad_id, reference_prefix=tok.reference_prefix())
    model_cfg = apply_overrides(model_cfg, args.model_set)
    mesh_sizes = tuple(int(x) for x in args.mesh.split(","))
    if len(mesh_sizes) != 3:
        raise SystemExit(f"--mesh {args.mesh!r}: give data,fsdp,tensor sizes, e.g. 1,-1,1")
    tc = TrainConfig(stage=args.stage, seq_len=args.seq_len, batch_size=args.global_batch, steps=args.steps,
                     lr=args.lr, warmup_steps=args.warmup_steps if args.warmup_steps is not None else args.steps // 20,
                     seed=args.seed, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                     mesh=MeshConfig(*mesh_sizes))
    tc = apply_overrides(tc, args.train_set)
    if args.global_batch % count:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of the {count} processes")
    dcfg = D.DataConfig(data_dir=data_dir, corpus=args.corpus, tfds_name=args.tfds_name, split=args.split,
                        seq_len=args.seq_len, batch_size=args.global_batch, shuffle=not args.no_shuffle,
                        seed=args.seed, shard_index=index, shard_count=count)
    log.info("%d process(es), %d local / %d global devices (%s); model %s (%.1fM params); stage %s, global batch "
             "%d x %d, mesh %s", count, jax.local_device_count(), jax.device_count(), jax.devices()[0].platform,
             model_cfg.name, model_cfg.num_params(embedding=True) / 1e6, tc.stage, tc.batch_size, tc.seq_len,
             mesh_sizes)
    it, info = data_iterator(dcfg, tok, model_cfg, tc, split=args.split, pairs=args.pairs)
    reference_fn = None
    if tc.stage == "continual":
        if not args.bank:
            raise SystemExit("stage 'continual' needs --bank (the memory bank holding the references)")
        bank_path = args.bank if is_url(args.bank) else os.path.abspath(args.bank)
        reference_fn = bank_reference_fn(bank_path, model_cfg.reference_len, model_cfg.pad_id, model_cfg.vocab_size)
        log.info("references from %s (%d memories); %s", reference_fn.bank.url, len(reference_fn.bank), info)
    init = local_path(args.init_params, "--init-params") if args.init_params else None
    t0 = time.perf_counter()
    train(model_cfg, tc, it, out, init_params=init, reference_fn=reference_fn, resume=not args.no_resume,
          progress=index == 0)
    if index == 0:
        last = None
        path = os.path.join(out, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                lines = [line for line in f if line.strip()]
            last = json.loads(lines[-1]) if lines else None
        summary = {"out": out, "processes": count, "devices": jax.device_count(), "stage": tc.stage,
                   "steps": tc.steps, "wall_s": round(time.perf_counter() - t0, 2), "last": last}
        print(json.dumps(summary))
    barrier("m3jax.launch: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
