"""Leakage filter of Memory3 (MEMORY3.md, "Retrieval"): how much of a reference a text contains.

    overlap(t, r) = max over windows w of t with |w| = 2|r| of LCS(w, r) / |r|

i.e. the longest common subsequence of the query text t and the reference r, counting only
matches whose positions in t span at most 2|r| tokens. A retrieved reference "leaks" the text it
was retrieved for when overlap > threshold: 2/3 at evaluation, 0.9 when pairing references with
training text. Sequences are token ids (any ints); an empty reference has overlap 0.

Algorithm: bit-parallel LCS (Crochemore et al. 2001 / Hyyro 2004). With one bit per reference
position, a state vector V (all ones at the start) is updated for each query token c as
    U = V & match(c);  V = (V + U) | (V ^ U)
and LCS = number of zero bits of V among the |r| low bits. Every (pair, window) is one row; rows
of many pairs run in lockstep as NumPy uint64 arrays [words, rows] (references longer than 64
tokens use several words with carry propagation). Only windows starting at a query token that
occurs in the reference (plus the last window) are evaluated: any other window is contained in
one of those after dropping its unmatched head.

Measured with `overlap_pairs` on 20k pairs, 2-core CPU shared with other jobs (load ~8), random
ids of a vocab of 8192 (Python lists in): query x reference 64 x 128 tokens ~60k pairs/s (~73k
from NumPy arrays; ~37k with Zipf-distributed ids, i.e. many matches); 64 x 32 ~110k/s; 64 x 16
(windows active) ~80k/s; 128 x 128 ~33k/s; 2048 x 128 ~540/s. A lone `overlap` call costs ~2 ms
of NumPy overhead: batch with `overlaps` / `overlap_pairs` / `leak_mask`.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

EVAL_THRESHOLD = 2 / 3  # drop references with overlap > 2/3 at evaluation
TRAIN_THRESHOLD = 0.9  # ... and > 0.9 when pairing references with training text
_CELLS = 1 << 23  # rows * steps * reference length per vectorized block (bounds memory)


def _concat(seqs: Sequence[Sequence[int]], what: str) -> tuple[np.ndarray, np.ndarray]:
    """Flatten sequences of ints: (tokens int64 [sum len], offsets int64 [len(seqs) + 1])."""
    lens = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    offsets = np.zeros(len(seqs) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    if offsets[-1] == 0:
        return np.zeros(0, np.int64), offsets
    if all(isinstance(s, np.ndarray) for s in seqs):
        parts = [s.ravel() for s in seqs]
        for i, p in enumerate(parts):
            if p.size and not np.issubdtype(p.dtype, np.integer):
                raise TypeError(f"{what}[{i}] must hold integer token ids, got dtype {p.dtype}")
        flat = np.concatenate(parts).astype(np.int64)
    else:
        try:
            flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, int(offsets[-1]))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{what} must be sequences of integer token ids: {e}") from None
    return flat, offsets


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of arange(lo[i], hi[i]) over i (int64)."""
    cnt = hi - lo
    total = int(cnt.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.cumsum(cnt) - cnt
    return np.arange(total, dtype=np.int64) - np.repeat(first - lo, cnt)


def _windows(t: np.ndarray, t_off: np.ndarray, qidx: np.ndarray, r: np.ndarray, r_off: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows to evaluate: (pair index, start offset into t, length), all int64 [rows].

    Pair p compares query qidx[p] (t[t_off[q]:t_off[q+1]]) with reference p."""
    n = np.diff(t_off)[qidx]
    q0 = t_off[:-1][qidx]
    m = np.diff(r_off)
    live = (n > 0) & (m > 0)
    short = live & (n <= 2 * m)  # one window: the whole query
    pairs, starts, lens = [np.flatnonzero(short)], [q0[short]], [n[short]]
    lp = np.flatnonzero(live & ~short)  # long queries: candidate window starts
    if lp.size:
        w = 2 * m[lp]
        last = n[lp] - w  # start of the last window (> 0)
        # candidates: starts s < last whose token occurs in the reference, and s = last
        pos_pair = np.repeat(np.arange(lp.size), last)
        pos = _ranges(np.zeros(lp.size, np.int64), last)
        tok = t[q0[lp][pos_pair] + pos]
        rtok = r[_ranges(r_off[:-1][lp], r_off[1:][lp])]
        r_pair = np.repeat(np.arange(lp.size), m[lp])
        both = np.concatenate([tok, rtok])
        lo, span = int(both.min()), int(both.max()) - int(both.min()) + 1
        if span * lp.size >= 1 << 62:  # keys would overflow: densify the token ids first
            _, both = np.unique(both, return_inverse=True)
            lo, span = 0, int(both.max()) + 1
        key_t = pos_pair * span + (both[:len(tok)] - lo)  # (pair, token) as one int64
        key_r = np.sort(r_pair * span + (both[len(tok):] - lo))
        at = np.minimum(np.searchsorted(key_r, key_t), len(key_r) - 1)
        hit = key_r[at] == key_t
        cand_pair = np.concatenate([pos_pair[hit], np.arange(lp.size)])
        cand_pos = np.concatenate([pos[hit], last])
        pairs.append(lp[cand_pair])
        starts.append(q0[lp][cand_pair] + cand_pos)
        lens.append(w[cand_pair])
    return (np.concatenate(pairs).astype(np.int64), np.concatenate(starts).astype(np.int64),
            np.concatenate(lens).astype(np.int64))


def _lcs_rows(t: np.ndarray, r: np.ndarray, start: np.ndarray, length: np.ndarray,
              r_start: np.ndarray, r_len: np.ndarray, pad_t: int, pad_r: int) -> np.ndarray:
    """LCS(t[start:start+length], r[r_start:r_start+r_len]) per row, all rows in lockstep."""
    R = len(start)
    L = int(length.max())
    M = int(r_len.max())
    words = (M + 63) // 64
    u_L = np.arange(L)
    tidx = start[:, None] + u_L[None, :]
    t_RL = np.where(u_L[None, :] < length[:, None], t[np.minimum(tidx, len(t) - 1)], pad_t)
    j_M = np.arange(M)
    ridx = r_start[:, None] + j_M[None, :]
    r_RM = np.where(j_M[None, :] < r_len[:, None], r[np.minimum(ridx, len(r) - 1)], pad_r)
    eq_RLM = t_RL[:, :, None] == r_RM[:, None, :]
    bytes_RLB = np.packbits(eq_RLM, axis=-1, bitorder="little")
    if bytes_RLB.shape[-1] != 8 * words:
        bytes_RLB = np.concatenate(
            [bytes_RLB, np.zeros((R, L, 8 * words - bytes_RLB.shape[-1]), np.uint8)], axis=-1)
    match_RLW = np.ascontiguousarray(bytes_RLB).view("<u8").astype(np.uint64)
    match_LWR = np.ascontiguousarray(match_RLW.transpose(1, 2, 0))  # [steps, words, rows]

    V = np.full((words, R), np.iinfo(np.uint64).max, np.uint64)
    U = np.empty_like(V)
    S = np.empty_like(V)
    if words == 1:
        v, u, s = V[0], U[0], S[0]
        for step in range(L):
            np.bitwise_and(v, match_LWR[step, 0], out=u)
            np.add(v, u, out=s)
            np.bitwise_xor(v, u, out=u)
            np.bitwise_or(s, u, out=v)
    else:
        carry = np.zeros(R, np.uint64)
        over = np.empty(R, bool)
        for step in range(L):
            np.bitwise_and(V, match_LWR[step], out=U)
            carry[:] = 0
            for w in range(words):  # S = V + U over little-endian uint64 limbs
                np.add(V[w], U[w], out=S[w])
                np.less(S[w], V[w], out=over)  # V + U wrapped
                np.add(S[w], carry, out=S[w])
                over |= (S[w] == 0) & (carry == 1)  # adding the carry-in wrapped
                carry[:] = over
            np.bitwise_xor(V, U, out=U)
            np.bitwise_or(S, U, out=V)
    # zero bits of V among the r_len low bits = LCS
    low = np.arange(words, dtype=np.int64)[:, None] * 64
    nbits = np.clip(r_len[None, :] - low, 0, 64)  # [words, rows] valid bits per word
    full = np.uint64(np.iinfo(np.uint64).max)
    mask_WR = np.where(nbits >= 64, full,
                       (np.uint64(1) << np.minimum(nbits, 63).astype(np.uint64)) - np.uint64(1))
    return np.bitwise_count(~V & mask_WR).sum(axis=0).astype(np.int64)


def _narrow(t: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Token arrays in the smallest dtype that holds them plus two padding ids that match
    nothing (not even each other): comparisons of uint16 run ~3x faster than of int64."""
    lo = min(int(t.min()), int(r.min()))
    hi = max(int(t.max()), int(r.max()))
    if lo >= 0 and hi <= 65533:
        return t.astype(np.uint16), r.astype(np.uint16), 65534, 65535
    i32 = np.iinfo(np.int32)
    if lo >= i32.min + 2 and hi <= i32.max:
        return t.astype(np.int32), r.astype(np.int32), lo - 1, lo - 2
    if lo < np.iinfo(np.int64).min + 2:
        raise ValueError("token ids must be greater than the int64 minimum + 1")
    return t, r, lo - 1, lo - 2


def _overlap_core(t: np.ndarray, t_off: np.ndarray, qidx: np.ndarray, r: np.ndarray,
                  r_off: np.ndarray) -> np.ndarray:
    """overlap(query qidx[p], reference p) for every reference p: float64 [P]."""
    P = len(r_off) - 1
    out = np.zeros(P, np.float64)
    pair, start, length = _windows(t, t_off, qidx, r, r_off)
    if len(pair) == 0:
        return out
    t, r, pad_t, pad_r = _narrow(t, r)
    m = np.diff(r_off)
    r_len = m[pair]
    r_start = r_off[:-1][pair]
    # Rows sorted by length; blocks bounded to _CELLS cells of the match tensor.
    order = np.lexsort((r_len, length))
    len_s, rlen_s = length[order], r_len[order]
    best = np.zeros(P, np.int64)
    i = 0
    while i < len(order):
        tail = slice(i, min(len(order), i + _CELLS))
        cells = np.arange(1, tail.stop - i + 1) * len_s[tail] * np.maximum.accumulate(rlen_s[tail])
        j = i + max(1, int(np.searchsorted(cells, _CELLS, side="right")))
        idx = order[i:j]
        lcs = _lcs_rows(t, r, start[idx], length[idx], r_start[idx], r_len[idx], pad_t, pad_r)
        np.maximum.at(best, pair[idx], lcs)
        i = j
    live = m > 0
    out[live] = best[live] / m[live]
    return out


def overlap_pairs(queries: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> np.ndarray:
    """overlap(queries[i], refs[i]) for every pair: float64 [P], vectorized over pairs."""
    if len(queries) != len(refs):
        raise ValueError(f"got {len(queries)} queries and {len(refs)} references; they pair up 1:1")
    if len(refs) == 0:
        return np.zeros(0, np.float64)
    t, t_off = _concat(queries, "queries")
    r, r_off = _concat(refs, "refs")
    return _overlap_core(t, t_off, np.arange(len(refs)), r, r_off)


def overlaps(query: Sequence[int], refs: Sequence[Sequence[int]]) -> np.ndarray:
    """overlap(query, ref) for each reference: float64 [len(refs)] (the query is read once)."""
    if len(refs) == 0:
        return np.zeros(0, np.float64)
    t, t_off = _concat([query], "query")
    r, r_off = _concat(refs, "refs")
    return _overlap_core(t, t_off, np.zeros(len(refs), np.int64), r, r_off)


def overlap(query: Sequence[int], ref: Sequence[int]) -> float:
    """LCS(query, ref) / |ref| with the matches spanning at most 2|ref| query tokens; 0 if ref
    is empty."""
    return float(overlap_pairs([query], [ref])[0])


def leaks(query: Sequence[int], ref: Sequence[int], threshold: float = EVAL_THRESHOLD) -> bool:
    """True when `ref` overlaps `query` by more than `threshold` (drop it)."""
    return overlap(query, ref) > threshold


def leak_mask(queries: Sequence[Sequence[int]], refs: Sequence[Sequence[int]],
              threshold: float = EVAL_THRESHOLD) -> np.ndarray:
    """Vectorized `leaks` over pairs (queries[i], refs[i]): bool [P], True = drop."""
    return overlap_pairs(queries, refs) > threshold


def keep_refs(query: Sequence[int], refs: Sequence[Sequence[int]],
              threshold: float = EVAL_THRESHOLD) -> list[int]:
    """Indices of the references that do not leak `query`, in order."""
    return np.flatnonzero(overlaps(query, refs) <= threshold).tolist()
