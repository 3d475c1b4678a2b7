"""byte_targets.py against an exhaustive enumeration with plain dictionaries, over a hand-sized byte vocabulary."""

import itertools
from collections import defaultdict

import numpy as np
import pytest

import byte_targets
from cli import UserError

# a toy BPE vocabulary: single bytes, merges, and "é" (C3 A9) and "€" (E2 82 AC) split across tokens
VOCAB = [b"c", b"a", b"f", b" ", b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xac", b"ca", b"caf", b"caf\xc3",
         b"\xa9 ", b"\xc3\xa9", b"\xe2\x82", b"\x82\xac", b"\xe2\x82\xac", b" c", b"fa", b"a "]
TEXT = "café € fa café €€ a caf".encode()


def greedy_tokens(text, vocab):
    """Longest-match tokenization: a valid (not BPE's own) split of the text into vocabulary tokens."""
    ids, at = [], 0
    while at < len(text):
        best = max((i for i, t in enumerate(vocab) if text.startswith(t, at)), key=lambda i: len(vocab[i]))
        ids.append(best)
        at += len(vocab[best])
    return ids


def teacher_rows(n, k, seed):
    """A random teacher distribution over VOCAB per position, cut to its top-k and the dropped mass."""
    rng = np.random.default_rng(seed)
    full = rng.dirichlet(np.full(len(VOCAB), 0.3), size=n)
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    listed = np.take_along_axis(full, order, axis=1)
    return full, order, listed, 1.0 - listed.sum(axis=1)


def enumerate_byte_targets(full_or_listed, tail, true_token):
    """
    For every depth d of the true token: {next byte: probability} and the tail,
    from the listed tokens and their mass, by enumerating every token and prefix.
    """
    targets = []
    for depth in range(len(true_token)):
        prefix = true_token[:depth]
        mass = defaultdict(float)
        for token, p in full_or_listed.items():
            if len(token) > depth and token[:depth] == prefix:
                mass[token[depth]] += p
        total = sum(mass.values()) + tail
        targets.append(({c: m / total for c, m in mass.items()}, tail / total))
    return targets


def as_dicts(indices, probs, tail):
    """One derived row as ({byte: probability}, tail), adding up slots that share a byte."""
    row = defaultdict(float)
    for i, p in zip(indices.tolist(), probs.tolist()):
        row[i] += p
    return {c: p for c, p in row.items() if p > 0}, float(tail)


@pytest.mark.parametrize("k", [len(VOCAB), 6, 2])
def test_derived_byte_targets_match_an_exhaustive_enumeration(k):
    ids = greedy_tokens(TEXT, VOCAB)
    assert b"".join(VOCAB[i] for i in ids) == TEXT and len(ids) < len(TEXT)
    full, order, listed, tail = teacher_rows(len(ids), k, seed=k)
    got = byte_targets.derive(order, listed, tail, ids, VOCAB, first_row=1)
    offsets = np.concatenate([[0], np.cumsum([len(VOCAB[i]) for i in ids])])
    assert len(got[0]) == len(TEXT)
    for j, token_id in enumerate(ids):
        token = VOCAB[token_id]
        listed_tokens = defaultdict(float)
        for i, p in zip(order[j], listed[j]):
            listed_tokens[VOCAB[i]] += p
        expected = enumerate_byte_targets(listed_tokens, tail[j], token)
        for depth in range(len(token)):
            b = offsets[j] + depth
            probs, tail_p = as_dicts(got[0][b], got[1][b], got[2][b])
            if j == 0 or not expected[depth][0]:  # no teacher row, or nothing listed continues: the hard label
                assert probs == {token[depth]: 1.0} and tail_p == 0.0
                continue
            want, want_tail = expected[depth]
            assert probs.keys() == want.keys()
            assert all(probs[c] == pytest.approx(want[c], abs=1e-6) for c in want)
            assert tail_p == pytest.approx(want_tail, abs=1e-6)
            assert sum(probs.values()) + tail_p == pytest.approx(1.0, abs=1e-6)


def test_without_truncation_the_targets_are_the_teachers_exact_next_byte_distribution():
    """k = vocabulary: the chain of byte targets over a token is P(token starts with w[:d+1] | starts with w[:d], goes on)."""
    ids = greedy_tokens(TEXT, VOCAB)
    full, order, listed, tail = teacher_rows(len(ids), len(VOCAB), seed=3)
    assert np.allclose(tail, 0.0)
    got = byte_targets.derive(order, listed, tail, ids, VOCAB)
    offsets = np.concatenate([[0], np.cumsum([len(VOCAB[i]) for i in ids])])
    for j in range(1, len(ids)):
        token = VOCAB[ids[j]]
        for depth in range(len(token)):
            # exact: the teacher's mass on tokens extending w[:d+1], over its mass on tokens extending w[:d] past it
            starts = lambda prefix, longer: sum(p for t, p in zip(VOCAB, full[j]) if t.startswith(prefix) and len(t) > longer)
            exact = starts(token[:depth + 1], depth) / starts(token[:depth], depth)
            probs, _ = as_dicts(got[0][offsets[j] + depth], got[1][offsets[j] + depth], got[2][offsets[j] + depth])
            assert probs[token[depth]] == pytest.approx(exact, rel=1e-5)


def test_first_byte_of_a_multibyte_character_split_across_tokens():
    """'é' is C3 A9: after "caf" the teacher may go on with "\\xc3" or "\\xc3\\xa9"; by hand, including the tail."""
    ids = [VOCAB.index(b"caf"), VOCAB.index(b"\xc3\xa9")]
    listed_ids = np.array([[0, 1, 2], [VOCAB.index(b"\xc3\xa9"), VOCAB.index(b"\xc3"), VOCAB.index(b" ")]])
    listed = np.array([[0.5, 0.3, 0.1], [0.4, 0.2, 0.3]])
    tail = np.array([0.1, 0.1])
    indices, probs, tails = byte_targets.derive(listed_ids, listed, tail, ids, VOCAB)
    first, second = as_dicts(indices[3], probs[3], tails[3]), as_dicts(indices[4], probs[4], tails[4])
    assert first[0] == pytest.approx({0xC3: 0.6, ord(" "): 0.3}) and first[1] == pytest.approx(0.1)
    # after C3 only "\xc3\xa9" goes on ("\xc3" ends there and is left out): 0.4 / (0.4 + 0.1), tail 0.1 / 0.5
    assert second[0] == pytest.approx({0xA9: 0.8}) and second[1] == pytest.approx(0.2)
    assert indices[4].tolist() == [0xA9, 0xA9, 0xA9]  # unused slots repeat the first byte


def test_bytes_that_differ_are_refused_in_one_line():
    ids = greedy_tokens(TEXT, VOCAB)
    data = np.frombuffer(TEXT, dtype=np.uint8)
    byte_targets.check_same_bytes(ids, VOCAB, data)
    for other in (data[:-1], np.concatenate([data[:5], [ord("x")], data[6:]]).astype(np.uint8)):
        with pytest.raises(UserError, match="do not hold the same bytes"):
            byte_targets.check_same_bytes(ids, VOCAB, other)


def test_long_inputs_are_derived_chunk_by_chunk_alike(monkeypatch):
    ids = greedy_tokens(TEXT * 4, VOCAB)
    _, order, listed, tail = teacher_rows(len(ids), 5, seed=9)
    whole = byte_targets.derive(order, listed, tail, ids, VOCAB)
    monkeypatch.setattr(byte_targets, "CHUNK_TOKENS", 7)
    for a, b in itertools.zip_longest(whole, byte_targets.derive(order, listed, tail, ids, VOCAB)):
        assert np.array_equal(a, b)
