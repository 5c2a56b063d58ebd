"""The held-out split of a corpus: which documents training never sees (evaluation reads them).

A document is held out by a hash of its title (its text when it has no title), so the split is the
same in the TFDS builder (`m3jax.train.data`), the evaluation (`m3jax.eval.heldout_split`) and the
demos, and stable when documents are added or reordered. No heavy imports: evaluation uses it
without loading the data pipeline.
"""

from __future__ import annotations

import hashlib

DEFAULT_HELDOUT_FRACTION = 0.05


def heldout_key(title: str, text: str) -> str:
    """What decides a document's split: its title, or its text when it has no title (stable when
    documents are added or reordered; duplicates of a title land in the same split)."""
    return title if title else text


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic held-out membership: the first 8 bytes of sha256(key) as a fraction of 2**64."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0**64
