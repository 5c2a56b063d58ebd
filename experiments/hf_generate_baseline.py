"""Transformers' `generate` on the same geometry and prompts: the side-by-side decode baseline.

Run by `bench_decode.py` in a subprocess (often another interpreter: a venv with the `bench`
extra, torch CPU + transformers), so this file imports neither jax nor m3jax. It builds a
`LlamaForCausalLM` with random weights (throughput does not depend on them) of the geometry
given in a JSON spec, and times greedy `generate` of exactly `new_tokens` tokens per prompt
(EOS ignored), batch by batch, prefill included, as m3jax's tokens/s is timed.

    python experiments/hf_generate_baseline.py spec.json   # prints one JSON object on stdout

spec.json: {"model": {vocab_size, hidden, num_layers, num_heads, num_kv_heads, head_dim,
mlp_dim, rope_theta, norm_eps, tie_embeddings}, "dtype": "float32"|"bfloat16",
"batches": [[[token ids] per prompt] per batch] (equal-length prompts), "new_tokens": int,
"repeats": int, "threads": int}
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    import torch
    import transformers

    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    torch.manual_seed(0)
    m = spec["model"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
    cfg = transformers.LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden"], intermediate_size=m["mlp_dim"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"], head_dim=m["head_dim"], rope_theta=m["rope_theta"],
        rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"],
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    new = int(spec["new_tokens"])
    batches = [torch.tensor(b, dtype=torch.long) for b in spec["batches"]]
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def run() -> tuple[float, int]:
        t0 = time.perf_counter()
        n = 0
        with torch.inference_mode():
            for ids in batches:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
                n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        return time.perf_counter() - t0, n

    first, _ = run()  # warm-up (allocator, kernels)
    walls, toks = [], 0
    for _ in range(max(1, int(spec.get("repeats", 1)))):
        wall, toks = run()
        walls.append(wall)
    tps = [toks / w for w in walls]
    print(json.dumps({"tokens_per_s": statistics.median(tps), "runs_tokens_per_s": tps, "first_call_s": first,
                      "new_tokens": toks, "threads": torch.get_num_threads(), "dtype": spec["dtype"],
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "attn_implementation": getattr(model.config, "_attn_implementation", None)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
