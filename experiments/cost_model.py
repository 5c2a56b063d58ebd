"""Memory3 cost model at the paper's scale, computed from m3jax's configs (nothing typed in but the
paper's figures it is checked against, and the stated assumptions).

    python experiments/cost_model.py                      # tables for memory3-2b, 1.1e8 references
    python experiments/cost_model.py --markdown           # the same as Markdown (experiments/README.md)
    python experiments/cost_model.py --preset smollm2-135m --references 1e6 --out cost.json

What is computed, per reference / memory (shape letters as in `m3jax.config.ModelConfig`):

storage   one memory = (memory_layers, 2, kv_heads, tokens_per_memory, head_dim) vectors, sized by
          `m3jax.memory.codec.memory_bytes(config, codec)` (bf16 / int8 / pq; `bytes_per_vector`
          is the single source of sizes), times the references (the paper's storage figures use
          1.12e8). The unsparsified figure keeps every layer, every query head and every reference
          token (the paper's 7.17 PiB), and the GQA one every layer and kv head (what a KV cache
          holds). Our bank also stores per reference its tokens, info and slot mask
          (`m3jax.memory.manifest.array_layout`) and, for pq, one set of codebooks.
index     ScaNN (`m3jax.memory.index.ScannParams.for_size(n)`): asymmetric-hashing codes of
          dims_per_block dims per 4-bit code (16 centers per block), the reorder data (float32 as
          m3jax builds it; int8 / bf16 when quantized), int64 ids, tree centers; for our embedder
          (all-MiniLM-L6-v2, dim 384) and the paper's (BGE-M3, dim 1024). ScaNN needs the whole
          index in RAM (LIBRARY_NOTES.md): the host count assumes `--host-ram-gib` per host.
write     FLOPs of encoding one reference: the memory layers' forward over prefix + reference_len
          tokens: dense 2 x params_per_layer x tokens, attention 4 x heads x head_dim x tokens^2
          (full score matrix), token-sparsification scores 2 x heads x head_dim x R^2; the same
          formula as the in-step encoding of `m3jax.train.loop.flops_per_token` (asserted equal).
          The paper's ~0.308 TFLOP is 2 x (half the non-embedding parameters) x 128 tokens.
read      FLOPs of one memory read by one chunk: chunk_size queries x memory layers x heads attend
          to tokens_per_memory extra keys: 4 x chunk x Lm x heads x head_dim x tokens_per_memory
          (QK^T and PV). The paper: ~1.4e-4 TFLOP.
rag       FLOPs of one use of the same reference as RAG text: the whole model's forward over the
          reference_len tokens (2 x non-embedding params x R, plus their attention) and the chunk's
          attention to those R extra keys at every layer. The paper: ~0.624 TFLOP = 2 x 2.4e9 x 128.
train     FLOPs of training the reference into the weights for one epoch (implicit memory):
          `flops_per_token(..., stage="warmup")` x reference_len (6 x params x tokens + attention).
pod time  references x write FLOPs / (chips x dense bf16 peak x assumed MFU), with the chips of
          `experiments/pod_configs.CHIPS`; embedding the references for the index is costed the
          same way (BERT-shaped encoders: MiniLM, BGE-M3); the pq encode (256 distances per
          subspace per vector) is shown to be negligible; the storage write bandwidth needed to
          keep up is bank bytes / time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m3jax.config import ModelConfig, preset  # noqa: E402
from m3jax.memory.codec import PQCodec, bytes_per_vector, make_codec, memory_bytes  # noqa: E402

TIB, PIB, GIB = 2.0**40, 2.0**50, 2.0**30

# The paper's figures (Yang et al. 2024, arXiv 2407.01178), for comparison only.
PAPER = {
    "references": 1.1e8,
    "storage_references": 1.12e8,
    "unsparsified_PiB": 7.17,
    "sparsified_bf16_TiB": 45.9,
    "vq_TiB": 4.02,
    "write_TFLOP": 0.308,
    "read_TFLOP": 1.4e-4,
    "rag_TFLOP": 0.624,
}

# BGE-M3 (the paper's retriever): an XLM-RoBERTa-large encoder.
BGE_M3 = dict(vocab_size=250002, hidden=1024, num_layers=24, num_heads=16, intermediate=4096,
              max_position_embeddings=8194, type_vocab_size=1)


# ---------------------------------------------------------------------------- FLOPs
def per_layer_params(cfg: ModelConfig) -> float:
    """Parameters of one decoder layer (attention + MLP + 2 norms)."""
    return (cfg.num_params() - cfg.hidden) / cfg.num_layers


def write_flops(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs to encode one full-length reference into one memory (forward through the memory
    layers only; see the module docstring)."""
    n = cfg.prefix_len + cfg.reference_len
    nh = cfg.num_heads * cfg.head_dim
    Lm = cfg.memory_layers
    out = {"dense": 2.0 * per_layer_params(cfg) * n * Lm,
           "attention": 4.0 * nh * n * n * Lm,
           "token_scores": 2.0 * nh * cfg.reference_len ** 2 * Lm}
    out["total"] = out["dense"] + out["attention"] + out["token_scores"]
    out["paper_method"] = 2.0 * per_layer_params(cfg) * Lm * cfg.reference_len  # 2 x params x 128
    return out


def write_flops_from_train_model(cfg: ModelConfig) -> float:
    """The write cost implied by `m3jax.train.loop.flops_per_token` (continual stage without
    memory_grad minus the warmup stage minus the memory-read attention, x chunk_size)."""
    from m3jax.train.loop import flops_per_token

    T, lb = 2 * cfg.chunk_size, 4
    extra = (flops_per_token(cfg, T, stage="continual", memory_grad=False, lookback=lb)
             - flops_per_token(cfg, T, stage="warmup"))
    read = 12.0 * cfg.memory_layers * cfg.num_heads * cfg.head_dim * (lb + 1) * cfg.tokens_per_memory
    return (extra - read) * cfg.chunk_size


def read_flops(cfg: ModelConfig) -> float:
    """FLOPs for one chunk of `chunk_size` tokens to read one memory (QK^T + PV at every memory
    layer and query head)."""
    return 4.0 * cfg.chunk_size * cfg.memory_layers * cfg.num_heads * cfg.head_dim * cfg.tokens_per_memory


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, memory_tokens: int = 0) -> float:
    """Forward FLOPs per context token of a `seq_len` sequence (`flops_per_token` / 3), plus the
    reading of `memory_tokens` memory keys per memory layer."""
    from m3jax.train.loop import flops_per_token

    base = flops_per_token(cfg, seq_len, stage="warmup") / 3.0
    return base + 4.0 * cfg.memory_layers * cfg.num_heads * cfg.head_dim * memory_tokens


def rag_flops(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs of one RAG use of one reference by one chunk (see the module docstring)."""
    R, nh, L = cfg.reference_len, cfg.num_heads * cfg.head_dim, cfg.num_layers
    out = {"dense": 2.0 * cfg.num_params() * R,
           "reference_attention": 4.0 * nh * R * R * L,
           "chunk_reads_reference": 4.0 * cfg.chunk_size * L * nh * R}
    out["total"] = sum(out.values())
    out["paper_method"] = 2.0 * cfg.num_params() * R
    return out


def train_flops(cfg: ModelConfig) -> float:
    """FLOPs of one training epoch over one reference (implicit memory), forward + backward."""
    from m3jax.train.loop import flops_per_token

    return flops_per_token(cfg, cfg.reference_len, stage="warmup") * cfg.reference_len


def bert_flops(hidden: int, num_layers: int, intermediate: int, tokens: int) -> float:
    """Forward FLOPs of a BERT encoder over `tokens` tokens (embeddings and pooling excluded)."""
    per_layer = 4 * hidden * hidden + 2 * hidden * intermediate
    return num_layers * (2.0 * per_layer * tokens + 4.0 * hidden * tokens * tokens)


def embedders() -> dict[str, dict[str, Any]]:
    """The retrievers' encoders: ours (all-MiniLM-L6-v2, read from the shipped asset's config when
    installed) and the paper's (BGE-M3)."""
    from m3jax.memory.embed import BertConfig

    mini, src = BertConfig(), "BertConfig defaults (= all-MiniLM-L6-v2)"
    try:
        from m3jax.assets import minilm_dir

        with open(os.path.join(minilm_dir(), "config.json"), encoding="utf-8") as f:
            mini, src = BertConfig.from_hf(json.load(f)), "the shipped all-MiniLM-L6-v2 config.json"
    except Exception:  # asset not installed: the defaults are MiniLM's shape
        pass
    bge = BertConfig(**BGE_M3)
    out = {}
    for name, c, s in (("all-MiniLM-L6-v2 (m3jax)", mini, src), ("BGE-M3 (paper)", bge, "XLM-R large shape")):
        out[name] = {"dim": c.hidden, "layers": c.num_layers, "hidden": c.hidden, "intermediate": c.intermediate,
                     "source": s}
    return out


# ---------------------------------------------------------------------------- storage / index
def metadata_bytes(cfg: ModelConfig, codec: str = "bf16") -> int:
    """Bytes our bank stores per reference besides the codes (tokens, info, slot mask)."""
    import numpy as np

    from m3jax.memory.manifest import array_layout

    c = make_codec(codec if codec != "pq" else "bf16", cfg.head_dim)
    return sum(int(np.prod(shape[1:])) * np.dtype(dt).itemsize
               for name, (shape, dt, _) in array_layout(cfg, c, 1).items() if name != "codes")


def pq_codebook_bytes(cfg: ModelConfig) -> int:
    p = PQCodec(cfg.head_dim)
    return cfg.memory_layers * 2 * cfg.num_kv_heads * p.subspaces * 256 * p.dsub * 4


def storage(cfg: ModelConfig, n: float) -> list[dict[str, Any]]:
    L, Lm, N, K, R, T, H = (cfg.num_layers, cfg.memory_layers, cfg.num_heads, cfg.num_kv_heads,
                            cfg.reference_len, cfg.tokens_per_memory, cfg.head_dim)
    bf16 = bytes_per_vector("bf16", H)
    rows = [
        {"what": f"unsparsified: {L} layers x {N} heads x {R} tokens, bf16", "codec": "bf16",
         "bytes_per_memory": L * 2 * N * R * bf16, "paper": f"{PAPER['unsparsified_PiB']} PiB"},
        {"what": f"unsparsified, GQA: {L} layers x {K} kv heads x {R} tokens, bf16", "codec": "bf16",
         "bytes_per_memory": L * 2 * K * R * bf16, "paper": None},
        {"what": f"sparsified: {Lm} memory layers x {K} kv heads x {T} tokens, bf16", "codec": "bf16",
         "bytes_per_memory": memory_bytes(cfg, "bf16"), "paper": f"{PAPER['sparsified_bf16_TiB']} TiB"},
        {"what": "sparsified, int8 + fp16 scale per vector", "codec": "int8",
         "bytes_per_memory": memory_bytes(cfg, "int8"), "paper": None},
        {"what": f"sparsified, pq {bytes_per_vector('pq', H)} B/vector", "codec": "pq",
         "bytes_per_memory": memory_bytes(cfg, "pq"), "paper": f"{PAPER['vq_TiB']} TiB (VQ)"},
    ]
    for r in rows:
        r["total_bytes"] = r["bytes_per_memory"] * n
        r["TiB"] = r["total_bytes"] / TIB
        r["PiB"] = r["total_bytes"] / PIB
    meta = metadata_bytes(cfg)
    rows.append({"what": f"our bank's metadata ({R} token ids, info, slot mask)", "codec": "-",
                 "bytes_per_memory": meta, "total_bytes": meta * n, "TiB": meta * n / TIB,
                 "PiB": meta * n / PIB, "paper": None})
    return rows


def index_size(n: float, dim: int) -> list[dict[str, Any]]:
    from m3jax.memory.index import ScannParams

    p = ScannParams.for_size(int(min(n, 2**62)))
    blocks = math.ceil(dim / p.dims_per_block)
    ah = blocks * 0.5  # 16 centers per block: 4 bits
    ids = 8.0
    tree = (p.num_leaves * dim * 4.0 + 4.0 * n) / n if p.tree else 0.0  # centers + leaf of each point
    rows = []
    for reorder, rb in (("float32 (as m3jax builds it)", 4.0 * dim), ("bfloat16", 2.0 * dim),
                        ("int8", 1.0 * dim), ("none", 0.0)):
        per = ah + rb + ids + tree
        rows.append({"dim": dim, "reorder": reorder, "ah_bytes": ah, "reorder_bytes": rb, "ids_bytes": ids,
                     "tree_bytes": tree, "bytes_per_vector": per, "total_bytes": per * n,
                     "GiB": per * n / GIB, "num_leaves": p.num_leaves if p.tree else 0})
    return rows


# ---------------------------------------------------------------------------- pod time
def pod_times(cfg: ModelConfig, n: float, mfu: float, pods: list[str]) -> list[dict[str, Any]]:
    from pod_configs import CHIPS, pod_config

    w = write_flops(cfg)["total"]
    emb = {name: bert_flops(e["hidden"], e["layers"], e["intermediate"], cfg.reference_len)
           for name, e in embedders().items()}
    pq = PQCodec(cfg.head_dim)
    pq_flops = 2.0 * 256 * cfg.head_dim * cfg.memory_layers * 2 * cfg.num_kv_heads * cfg.tokens_per_memory
    rows = []
    for name in pods:
        pod = pod_config(name)
        chip = CHIPS[pod.topology.split(":")[0]]
        dims = [int(x) for x in pod.topology.split(":")[1].split("x")]
        chips = math.prod(dims) * pod.num_slices
        rate = chips * chip.peak_flops * mfu
        t = n * w / rate
        r = {"pod": name, "chip": chip.name, "chips": chips, "peak_flops_per_chip": chip.peak_flops,
             "mfu": mfu, "write_s": t, "write_h": t / 3600,
             "bank_write_GBps_bf16": n * memory_bytes(cfg, "bf16") / t / 1e9,
             "bank_write_GBps_pq": n * memory_bytes(cfg, "pq") / t / 1e9,
             "pq_encode_fraction": pq_flops / w, "pq_subspaces": pq.subspaces}
        for en, f in emb.items():
            r[f"embed_h[{en}]"] = n * f / rate / 3600
        rows.append(r)
    return rows


# ---------------------------------------------------------------------------- report
def build(cfg: ModelConfig, n: float, n_storage: float, mfu: float, pods: list[str],
          host_ram_gib: float) -> dict[str, Any]:
    w, rag = write_flops(cfg), rag_flops(cfg)
    w_train = write_flops_from_train_model(cfg)
    assert abs(w_train - w["total"]) <= 1e-6 * w["total"], (w_train, w["total"])
    r = read_flops(cfg)
    tr = train_flops(cfg)
    flops = {
        "write": {**w, "paper": PAPER["write_TFLOP"] * 1e12},
        "read": {"total": r, "paper": PAPER["read_TFLOP"] * 1e12},
        "rag": {**rag, "paper": PAPER["rag_TFLOP"] * 1e12},
        "train_epoch": {"total": tr},
        "rag_over_read": rag["total"] / r,
        "write_over_rag": w["total"] / rag["total"],
        # a memory pays for its writing once write + u x read < u x rag
        "break_even_uses": w["total"] / (rag["total"] - r),
        "write_whole_kb_flops": n * w["total"],
    }
    emb = embedders()
    index = {name: index_size(n, e["dim"]) for name, e in emb.items()}
    for rows in index.values():
        for row in rows:
            row["hosts_at_ram"] = math.ceil(row["total_bytes"] / (host_ram_gib * GIB))
    return {
        "preset": cfg.name, "model": {"num_params_non_embedding": cfg.num_params(),
                                      "num_params": cfg.num_params(embedding=True),
                                      "layers": cfg.num_layers, "memory_layers": cfg.memory_layers,
                                      "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                                      "head_dim": cfg.head_dim, "tokens_per_memory": cfg.tokens_per_memory,
                                      "reference_len": cfg.reference_len, "prefix_len": cfg.prefix_len,
                                      "chunk_size": cfg.chunk_size},
        "references": n, "storage_references": n_storage,
        "storage": storage(cfg, n_storage),
        "storage_at_references": storage(cfg, n),
        "pq_codebook_bytes": pq_codebook_bytes(cfg),
        "index": index, "embedders": emb, "host_ram_gib": host_ram_gib,
        "flops": flops,
        "pod": pod_times(cfg, n, mfu, pods),
        "assumptions": {
            "mfu": mfu,
            "note": ("pod time = references x write FLOPs / (chips x dense bf16 peak x MFU); the "
                     "encoder is a forward-only, batch-parallel pass of the memory layers with "
                     "128+prefix-token sequences, so a dense-model MFU is a fair guess; storage "
                     "bandwidth, host pq encoding and data loading are assumed to overlap"),
        },
        "paper": PAPER,
    }


def _sci(x: float) -> str:
    return f"{x:.3g}"


def render(res: dict[str, Any], markdown: bool = False) -> str:
    from _bench_utils import table

    out = []

    def emit(title: str, rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> None:
        if markdown:
            out.append(f"**{title}**\n")
            out.append("| " + " | ".join(h for _, h, _ in cols) + " |")
            out.append("|" + "|".join("---" for _ in cols) + "|")
            from _bench_utils import fmt

            for r in rows:
                out.append("| " + " | ".join(fmt(r.get(k), s) for k, _, s in cols) + " |")
            out.append("")
        else:
            out.append(title)
            out.append(table(rows, cols))
            out.append("")

    m = res["model"]
    out.append(f"Cost model: {res['preset']} ({m['num_params_non_embedding'] / 1e9:.2f}B non-embedding "
               f"parameters, {m['layers']} layers, memory layers {m['memory_layers']}), "
               f"{res['references']:.3g} references (storage: {res['storage_references']:.3g})\n")
    emit(f"Storage of {res['storage_references']:.3g} references", res["storage"],
         [("what", "memory", ""), ("bytes_per_memory", "bytes/memory", ",d"), ("TiB", "TiB", ",.2f"),
          ("PiB", "PiB", ".3f"), ("paper", "paper", "")])
    out.append(f"pq codebooks (shared by the bank): {res['pq_codebook_bytes'] / 2**20:.1f} MiB\n")
    rows = []
    for name, rs in res["index"].items():
        for r in rs:
            rows.append({"embedder": name, **r})
    emit(f"ScaNN index of {res['references']:.3g} references (AH 2 dims/4-bit code + reorder data + "
         f"int64 id; hosts at {res['host_ram_gib']:.0f} GiB RAM)", rows,
         [("embedder", "embedder", ""), ("dim", "dim", "d"), ("reorder", "reorder data", ""),
          ("bytes_per_vector", "bytes/vector", ",.0f"), ("GiB", "GiB", ",.0f"), ("hosts_at_ram", "hosts", "d")])
    f = res["flops"]
    frows = [
        {"what": "write one memory (encode a 128-token reference)", "ours": f["write"]["total"] / 1e12,
         "paper_method": f["write"]["paper_method"] / 1e12, "paper": f["write"]["paper"] / 1e12,
         "detail": (f"dense {f['write']['dense'] / 1e12:.3f} + attention {f['write']['attention'] / 1e12:.4f}"
                    f" + token scores {f['write']['token_scores'] / 1e12:.4f}")},
        {"what": "read one memory (one 64-token chunk)", "ours": f["read"]["total"] / 1e12,
         "paper_method": None, "paper": f["read"]["paper"] / 1e12, "detail": "4 x chunk x Lm x heads x H x 8"},
        {"what": "RAG: one use of the reference as text", "ours": f["rag"]["total"] / 1e12,
         "paper_method": f["rag"]["paper_method"] / 1e12, "paper": f["rag"]["paper"] / 1e12,
         "detail": (f"dense {f['rag']['dense'] / 1e12:.3f} + attention "
                    f"{(f['rag']['reference_attention'] + f['rag']['chunk_reads_reference']) / 1e12:.4f}")},
        {"what": "train it into the weights (one epoch)", "ours": f["train_epoch"]["total"] / 1e12,
         "paper_method": None, "paper": None, "detail": "flops_per_token x 128"},
    ]
    emit("FLOPs per reference (TFLOP)", frows,
         [("what", "operation", ""), ("ours", "m3jax (all terms)", ".3g"),
          ("paper_method", "paper's method", ".3g"), ("paper", "paper", ".3g"), ("detail", "terms", "")])
    out.append(f"RAG / read = {f['rag_over_read']:,.0f}x; a memory pays for its writing after "
               f"{f['break_even_uses']:.2f} uses (write + u x read < u x RAG); writing all "
               f"{res['references']:.3g} references = {f['write_whole_kb_flops']:.3g} FLOP\n")
    prow = []
    for r in res["pod"]:
        e = {k: v for k, v in r.items() if k.startswith("embed_h[")}
        prow.append({**r, "embed_mini": next((v for k, v in e.items() if "MiniLM" in k), None),
                     "embed_bge": next((v for k, v in e.items() if "BGE" in k), None)})
    emit(f"Encoding the whole knowledge base on a TPU pod (assumed MFU {res['assumptions']['mfu']:.0%})", prow,
         [("pod", "pod", ""), ("chips", "chips", "d"), ("write_h", "write memories (h)", ".3g"),
          ("embed_mini", "embed, MiniLM (h)", ".3g"), ("embed_bge", "embed, BGE-M3 (h)", ".3g"),
          ("bank_write_GBps_bf16", "bank GB/s bf16", ".1f"), ("bank_write_GBps_pq", "bank GB/s pq", ".2f")])
    if res["pod"]:
        out.append(f"pq encoding (256 distances per subspace per vector) = "
                   f"{res['pod'][0]['pq_encode_fraction']:.2%} of the write FLOPs\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="memory3-2b")
    ap.add_argument("--references", type=float, default=PAPER["references"])
    ap.add_argument("--storage-references", type=float, default=None,
                    help="references for the storage table (default: 1.12e8 for memory3-2b, as the paper)")
    ap.add_argument("--mfu", type=float, default=0.40, help="assumed MFU of the encoding pass on TPU")
    ap.add_argument("--pods", default="v5e-256,v4-128,v5p-128,v6e-256")
    ap.add_argument("--host-ram-gib", type=float, default=400.0, help="RAM per index host (ScaNN is in-memory)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    cfg = preset(args.preset)
    n_storage = args.storage_references or (PAPER["storage_references"] if cfg.name == "memory3-2b" else args.references)
    res = build(cfg, args.references, n_storage, args.mfu, [p for p in args.pods.split(",") if p],
                args.host_ram_gib)
    print(render(res, markdown=args.markdown))
    if args.out:
        from _bench_utils import write_json

        write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
