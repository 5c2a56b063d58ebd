"""Leakage filter: overlap(t, r) = max over windows of t of length 2|r| of LCS(window, r) / |r|."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from m3jax.memory.overlap import (EVAL_THRESHOLD, TRAIN_THRESHOLD, keep_refs, leak_mask, leaks,
                                  overlap, overlap_pairs, overlaps)


# ----------------------------------------------------------------------------- slow reference
def lcs_textbook(a, b) -> int:
    """O(|a| |b|) dynamic programme, as in the textbooks."""
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                dp[i][j] = dp[i - 1][j - 1] + 1
            else:
                dp[i][j] = max(dp[i - 1][j], dp[i][j - 1])
    return dp[len(a)][len(b)]


def overlap_reference(t, r) -> Fraction:
    """Every window of t of length 2|r| (the whole t when shorter), textbook LCS each."""
    if not r or not t:
        return Fraction(0)
    w = 2 * len(r)
    starts = range(max(1, len(t) - w + 1))
    return Fraction(max(lcs_textbook(t[s:s + w], r) for s in starts), len(r))


# ----------------------------------------------------------------------------- hand-made cases
def test_identical_and_disjoint():
    r = [5, 6, 7, 8, 9]
    assert overlap(r, r) == 1.0
    assert overlap([1, 2, 3, 4], r) == 0.0
    assert overlap([1, 2, 3] + r + [4, 4, 4], r) == 1.0


def test_scattered_subsequence_within_two_r_counts_fully():
    r = [1, 2, 3, 4]  # window 8
    t = [9, 1, 9, 2, 9, 9, 3, 9, 4, 9]  # 1..4 at positions 1, 3, 6, 8: span 8
    assert overlap(t, r) == 1.0


def test_matches_wider_than_two_r():
    r = [1, 2, 3, 4]
    t = [1] + [9] * 8 + [2, 3, 4]  # span 12 > 8: best window holds 2, 3, 4
    assert overlap(t, r) == 0.75
    t = [1, 2] + [9] * 10 + [3, 4]  # windows hold {1, 2} or {3, 4}
    assert overlap(t, r) == 0.5
    t = [1, 9, 9, 9, 9, 9, 9, 2, 9, 9, 9, 3, 4]  # 1 and 2 span 8 (ok); 2, 3, 4 span 6
    assert overlap(t, r) == 0.75


def test_partial_overlap_fractions():
    assert overlap([1, 2, 3], [1, 2, 3, 4, 5, 6]) == 0.5
    assert overlap([3, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    assert overlap([1, 3, 5, 7], [1, 2, 3, 4, 5]) == 0.6
    assert overlap([2, 1], [1, 2]) == 0.5
    # reference longer than the query: at most |t| / |r|
    assert overlap([4, 5], list(range(10))) == 0.2


def test_empty_inputs():
    assert overlap([1, 2, 3], []) == 0.0
    assert overlap([], [1, 2]) == 0.0
    assert overlap([], []) == 0.0
    assert overlap_pairs([], []).shape == (0,)
    np.testing.assert_array_equal(overlaps([1, 2], [[], [1], [3]]), [0.0, 1.0, 0.0])


def test_repeated_tokens():
    assert overlap([7, 7, 7], [7, 7, 7, 7]) == 0.75
    assert overlap([7] * 10, [7, 7]) == 1.0


def test_thresholds_and_filters():
    assert EVAL_THRESHOLD == pytest.approx(2 / 3) and TRAIN_THRESHOLD == 0.9
    r = [1, 2, 3]
    assert not leaks([1, 2, 9], r)  # exactly 2/3: not above the threshold
    assert leaks([1, 2, 3], r)
    assert leaks([1, 2, 3], r, TRAIN_THRESHOLD)
    ten = list(range(10))
    assert leaks(ten[:9] + [99], ten, 0.8) and not leaks(ten[:9] + [99], ten, TRAIN_THRESHOLD)
    np.testing.assert_array_equal(leak_mask([[1, 2, 3], [1, 2, 9]], [r, r]), [True, False])
    assert keep_refs([1, 2, 3, 4], [[1, 2, 3], [5, 6], [4, 9, 9]]) == [1, 2]


def test_numpy_inputs_and_errors():
    t = np.array([1, 2, 3, 4], np.int32)
    assert overlap(t, np.array([2, 3], np.int64)) == 1.0
    with pytest.raises(ValueError, match="pair up"):
        overlap_pairs([[1]], [[1], [2]])
    with pytest.raises(TypeError):
        overlap(["a", "b"], ["a"])


def test_long_references_multiword():
    rng = np.random.default_rng(1)
    r = rng.integers(0, 50, 150).tolist()  # 3 uint64 words
    t = r[:70] + [99] * 5 + r[70:]
    assert overlap(t, r) == 1.0
    t = r[::2]
    assert overlap(t, r) == 75 / 150


# ----------------------------------------------------------------------------- randomized
@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_on_random_sequences(seed):
    rng = np.random.default_rng(seed)
    queries, refs = [], []
    for _ in range(150):
        vocab = int(rng.integers(2, 8))
        m = int(rng.integers(0, 12))
        n = int(rng.integers(0, 40))
        r = rng.integers(0, vocab, m).tolist()
        t = rng.integers(0, vocab, n).tolist()
        if m and rng.random() < 0.3:  # plant the reference, stretched out
            t = list(t)
            for tok in r:
                t.insert(int(rng.integers(0, len(t) + 1)), tok)
        queries.append(t)
        refs.append(r)
    got = overlap_pairs(queries, refs)
    want = np.array([float(overlap_reference(t, r)) for t, r in zip(queries, refs)])
    np.testing.assert_array_equal(got, want)
    # one query against many references, and the single-pair form
    got = overlaps(queries[0], refs)
    want = [float(overlap_reference(queries[0], r)) for r in refs]
    np.testing.assert_array_equal(got, want)
    assert overlap(queries[1], refs[1]) == float(overlap_reference(queries[1], refs[1]))


def test_matches_reference_across_word_boundaries():
    rng = np.random.default_rng(7)
    queries, refs = [], []
    for m in (63, 64, 65, 100, 128, 129):
        r = rng.integers(0, 3, m).tolist()
        for n in (m - 20, m + 7, 2 * m + 15):
            queries.append(rng.integers(0, 3, n).tolist())
            refs.append(r)
    got = overlap_pairs(queries, refs)
    want = np.array([float(overlap_reference(t, r)) for t, r in zip(queries, refs)])
    np.testing.assert_array_equal(got, want)


def test_any_int_ids_give_the_same_overlaps():
    """uint16, int32 and int64 code paths (and key densification for huge ids) agree."""
    rng = np.random.default_rng(11)
    queries = [rng.integers(0, 6, int(rng.integers(1, 60))) for _ in range(60)]
    refs = [rng.integers(0, 6, int(rng.integers(1, 12))) for _ in range(60)]
    base = overlap_pairs(queries, refs)
    assert np.any(base > 0) and np.any(base < 1)
    for f in (lambda a: a - 3, lambda a: a * 10**15, lambda a: (a - 3) * 2**60):
        np.testing.assert_array_equal(overlap_pairs([f(q) for q in queries], [f(r) for r in refs]), base)
