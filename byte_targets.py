"""
Byte-level targets from a teacher that speaks BPE: what distill.py --teacher_dataset gives a bytes student.

The teacher's cache holds, for token position j, its top-k next-token probabilities p(t) and the mass
it dropped, tau. Token j covers the bytes w = w_0 ... w_{L-1} of the text; the byte at depth d of it is
predicted from w[:d]. The listed tokens that continue that prefix (longer than d, starting with w[:d])
give each next byte c the mass

    m_c = sum of p(t) over listed t with t[:d] == w[:d] and t[d] == c,   M = sum over c of m_c

and the byte target is

    P(c) = m_c / (M + tau),    P(any other byte) = tau / (M + tau).

At depth 0 every listed token continues the empty prefix, so the tail is exactly the dropped mass. At
depth >= 1 the dropped tokens' bytes are unknown, so all of tau is taken to be mass that may continue
the prefix (the most it can be), kept as one "any other byte" outcome, never spread over bytes it may
not cover. With k = vocabulary (tau = 0) this is exactly the teacher's distribution of the next byte,
given that token j starts with w[:d] and goes on past it.

What it ignores: tokenizations that end a token at w[:d] (the next byte would come from the following
token's distribution, which the cache does not hold for that history: such tokens are left out of
both m_c and M), other token boundaries that reach w[:d], and which bytes the dropped tokens would add.
Where no listed token continues the prefix, or the position has no teacher row, the target is the
data's own byte with probability 1: the hard label.
"""

import time

import numpy as np

import train
from cli import UserError
from tokenizer import BYTE_VOCAB, token_byte_table

CHUNK_TOKENS = 8192  # token rows derived at a time: (chunk, k, longest token) int16 arrays stay small


def byte_matrix(table):
    """(V, longest) int16 matrix of every token's bytes, -1 past its end, and the lengths (V,)."""
    lengths = np.array([len(b) for b in table], dtype=np.int64)
    matrix = np.full((len(table), max(1, lengths.max())), -1, dtype=np.int16)
    for i, token in enumerate(table):
        matrix[i, :len(token)] = np.frombuffer(token, dtype=np.uint8)
    return matrix, lengths


def token_offsets(ids, lengths):
    """Byte offset of every token in the text, and the end: (n + 1,) int64."""
    return np.concatenate([[0], np.cumsum(lengths[np.asarray(ids, dtype=np.int64)])])


def check_same_bytes(ids, table, data, what="the teacher's data", other="the student's"):
    """Refuse, in one line, token ids whose bytes do not spell out `data` (uint8) exactly."""
    text = b"".join(table[i] for i in np.asarray(ids).tolist())
    data = np.asarray(data, dtype=np.uint8).tobytes()
    if text != data:
        first = next((i for i, (a, b) in enumerate(zip(text, data)) if a != b), min(len(text), len(data)))
        raise UserError(f"{what} and {other} do not hold the same bytes ({len(text):,} vs {len(data):,} "
                        f"bytes, first difference at byte {first:,}): prepare both from the same corpus")


def derive(indices, probs, tail, ids, table, first_row=1):
    """
    Byte targets for every byte of the tokens `ids` (n,):
    - indices (n, k), probs (n, k), tail (n,): row j is the teacher's top-k
      prediction of token j (probabilities, not logs) and its dropped mass;
      rows below first_row have no prediction (row 0: nothing precedes token 0)
    - table: the bytes of every token id
    Returns (byte_indices (B, K) uint8, byte_probs (B, K) float32, byte_tail (B,)
    float32), B = the bytes ids cover, K = min(k, BYTE_VOCAB). Row b is the
    prediction of byte b; a row lists at most k bytes (k listed tokens have at
    most k next bytes): the unused slots have probability 0 and repeat the
    first slot's byte, so the slots' bytes and "any other byte" stay a partition.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n, k = indices.shape
    matrix, lengths = byte_matrix(table)
    offsets = token_offsets(ids, lengths)
    slots = min(k, BYTE_VOCAB)
    out_indices = np.zeros((offsets[-1], slots), dtype=np.uint8)
    out_probs = np.zeros((offsets[-1], slots), dtype=np.float32)
    out_tail = np.zeros(offsets[-1], dtype=np.float32)
    for start in range(0, n, CHUNK_TOKENS):
        rows = slice(start, min(n, start + CHUNK_TOKENS))
        derive_chunk(np.asarray(indices[rows], dtype=np.int64), np.asarray(probs[rows], dtype=np.float64),
                     np.asarray(tail[rows], dtype=np.float64), matrix[ids[rows]], lengths[ids[rows]],
                     offsets[rows], np.arange(rows.start, rows.stop) >= first_row, matrix,
                     out_indices, out_probs, out_tail)
    return out_indices, out_probs, out_tail


def derive_chunk(indices, probs, tail, true_bytes, true_lengths, offsets, has_teacher, matrix,
                 out_indices, out_probs, out_tail):
    """derive() for one chunk of c token rows, depth by depth, written into the out arrays."""
    c, k = indices.shape
    slots = out_indices.shape[1]
    listed = matrix[indices]  # (c, k, longest): the listed tokens' bytes
    continuing = np.ones((c, k), dtype=bool)  # listed token still agrees with w[:d]
    row_ids = np.arange(c)[:, None]
    for depth in range(true_bytes.shape[1]):
        live = true_lengths > depth  # tokens with a byte at this depth
        if not live.any():
            break
        next_byte = listed[:, :, depth]
        agrees = continuing & (next_byte >= 0)  # longer than the prefix and starting with it
        mass = np.where(agrees, probs, 0.0)
        flat = (row_ids * BYTE_VOCAB + np.clip(next_byte, 0, None)).ravel()
        per_byte = np.bincount(flat, weights=mass.ravel(), minlength=c * BYTE_VOCAB).reshape(c, BYTE_VOCAB)
        # the (at most k) bytes with mass first
        order = np.argsort(-per_byte, axis=1, kind="stable")[:, :slots]
        top = np.take_along_axis(per_byte, order, axis=1)
        total = top.sum(axis=1) + tail
        known = has_teacher & (top[:, 0] > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            byte_probs = np.where(known[:, None], top / total[:, None], 0.0)
            byte_tail = np.where(known, tail / total, 0.0)
        byte_index = np.where(top > 0, order, order[:, :1])  # empty slots repeat the first byte
        truth = true_bytes[:, depth].astype(np.int64)
        byte_index[~known] = truth[~known, None]  # the hard label where the teacher says nothing
        byte_probs[~known, 0] = 1.0
        positions = offsets[live] + depth
        out_indices[positions] = byte_index[live]
        out_probs[positions] = byte_probs[live]
        out_tail[positions] = byte_tail[live]
        continuing &= next_byte == truth[:, None]


# ----------------------------------------------------------------------------
# a bytes student's targets from a teacher's token cache

def load_teacher_dataset(name, dataset):
    """The dataset `name`: the student's bytes data in a teacher's tokenization, checked byte for byte."""
    if dataset.meta["tokenization"] != "bytes":
        raise UserError(f"--teacher_dataset distills a bytes student, and {dataset.meta['tokenization']} "
                        "data is not bytes: prepare the student's data with --tokenization=bytes")
    teacher_data = train.load_dataset(name, 1)
    if teacher_data.meta["tokenization"] in ("bytes", "bytes_gpt2"):
        raise UserError(f"--teacher_dataset={name} is {teacher_data.meta['tokenization']} data: "
                        "it must be the teacher's own tokenization of the corpus (or drop --teacher_dataset)")
    table = token_byte_table(teacher_data.meta["tokenization"])
    for split in ("train", "val"):
        check_same_bytes(getattr(teacher_data, split), table, getattr(dataset, split),
                         what=f"--teacher_dataset's {split} split", other=f"the student's {split} split")
    return teacher_data


def byte_cache(token_cache, token_ids, tokenization, no_mass):
    """
    A teacher cache over tokens (distill.py's: log-probabilities) turned into one over the bytes
    of token_ids, in the same form; an empty slot or tail gets the log-probability no_mass.
    """
    t0 = time.perf_counter()
    indices, probs, tail = derive(token_cache["indices"], np.exp(token_cache["logprobs"].astype(np.float64)),
                                  np.exp(token_cache["tail"].astype(np.float64)), token_ids,
                                  token_byte_table(tokenization))
    with np.errstate(divide="ignore"):
        cache = {"indices": indices, "logprobs": np.maximum(np.log(probs), no_mass).astype(np.float16),
                 "tail": np.maximum(np.log(tail), no_mass).astype(np.float32)}
    certain = float((probs[:, 0] == 1.0).mean())
    print(f"byte targets: {len(indices):,} bytes from {len(token_ids):,} teacher tokens in "
          f"{time.perf_counter() - t0:.1f} s; mean tail {tail.mean():.3f}, one byte certain "
          f"(hard labels included) at {certain:.1%} of bytes")
    return cache
