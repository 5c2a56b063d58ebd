"""Codecs for stored memory vectors (one head_dim vector of a key or value at a time).

`bf16`: raw bfloat16. `int8`: symmetric int8 with one float16 scale per vector.
`pq`: product quantization, one byte (256 centroids) per subspace; by default sized like the
paper, 14 bytes per 80-dim vector (scaled to other head dims as ceil(14 * head_dim / 80)).
"""

from __future__ import annotations

import math


def default_pq_subspaces(head_dim: int) -> int:
    """Bytes (= subspaces of 256 centroids) per vector for `pq`: the paper's 14 per 80 dims."""
    return max(1, min(head_dim, math.ceil(14 * head_dim / 80)))


def bytes_per_vector(codec: str, head_dim: int, *, subspaces: int | None = None) -> int:
    """Stored bytes of one head_dim vector under `codec` (codebooks excluded: they are shared)."""
    if codec == "bf16":
        return 2 * head_dim
    if codec == "f32":
        return 4 * head_dim
    if codec == "int8":
        return head_dim + 2
    if codec == "pq":
        return subspaces if subspaces is not None else default_pq_subspaces(head_dim)
    raise ValueError(f"unknown memory codec {codec!r}; choose from bf16, f32, int8, pq")
