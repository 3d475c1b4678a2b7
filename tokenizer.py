"""
Tokenization: how text becomes the numbers a model reads, and back.

Every dataset in this project is one of these tokenizations of the same bytes:

- `bytes`       one token per byte: vocabulary 256, nothing to learn, nothing lost.
- `bpe`         GPT-2's byte-level BPE through tiktoken: 50,257 tokens of about 3-4 bytes each.
- `bytes_gpt2`  the bytes, with an end marker (id 256, no bytes of text) after each GPT-2 token:
                vocabulary 257. GPT-2's cuts written into a byte stream, for a pooled model
                that pools by GPT-2 tokens (byte_tokenizer.py says why they must be in the data).
- `hf:DIR`      a Hugging Face tokenizer from a local folder or .gguf file (a distillation teacher's).

A pooled byte model (byte_tokenizer.py) reads `bytes` data and finds its chunk ends itself
(or, on `bytes_gpt2` data, at the markers); `python byte_tokenizer.py "text"` shows where.

Each token id stands for a fixed byte string (`token_byte_table`): that is how generated
ids become text, and how many bytes of text a predicted token covers, the denominator of
bits per byte. data/prepare.py stores the lengths beside the data (token_bytes.npy), so
training needs no tokenizer to report bits per byte.

At the end of the file, `train_bpe` and `bpe_encode` are a small teaching BPE (EXERCISES.md's
exercise 16): no dataset uses them; `bpe` is tiktoken's GPT-2.

No torch in this file: data/prepare.py imports it without loading the model.

    python -c "import tokenizer; print(tokenizer.encode('bytes_gpt2', 'Hello, world!'))"
"""

import functools
import re
from pathlib import Path

import numpy as np

from cli import UserError

BYTE_VOCAB = 256  # the byte vocabulary: one token per byte value
GPT2_VOCAB = 50257  # GPT-2's BPE vocabulary: 50,000 merges, 256 bytes and <|endoftext|>
HF_PREFIX = "hf:"  # "hf:<folder>" names a Hugging Face tokenization in meta.json
TOKENIZATIONS = ("bytes", "bpe", "bytes_gpt2", "hf")
GPT2_TOKEN_END = BYTE_VOCAB  # bytes_gpt2: the id after each GPT-2 token's bytes
BYTES_GPT2_VOCAB = GPT2_TOKEN_END + 1  # bytes_gpt2's vocabulary: the bytes and the end marker
TOKEN_BYTES_NAME = "token_bytes.npy"  # beside a prepared dataset: how many bytes of text each token id is


# ----------------------------------------------------------------------------
# GPT-2's BPE (tiktoken) and Hugging Face tokenizers

@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's GPT-2 encoding, with a one-line error when its files cannot be had (offline, no cache)."""
    import tiktoken  # only BPE and GPT-2 token ends (bytes_gpt2, --boundary=gpt2) need it
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' connection errors, or a corrupt cache
        raise UserError(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}): it downloads its "
                        "files once; offline, set TIKTOKEN_CACHE_DIR to a folder that holds them") from None


@functools.lru_cache(maxsize=4)
def load_hf_tokenizer(path):
    """
    A Hugging Face tokenizer from a local folder, or from a .gguf file (transformers reads both).
    Loaded once per path and process: a .gguf tokenizer takes seconds to read, and a prompt's
    encoding and its byte table both need it.
    """
    try:
        from transformers import AutoTokenizer  # only hf tokenizations need it
    except ImportError:
        raise UserError("a Hugging Face tokenizer needs transformers: pip install transformers") from None
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer folder {path} not found")
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def _is_byte_level(tokenizer):
    """Byte-level BPE (GPT-2, SmolLM2) writes each byte as one printable character, decoded by ByteLevel."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in backend.to_str()


def hf_token_bytes(tokenizer):
    """
    The bytes of every id below len(tokenizer):
    - byte-level BPE: map each piece's characters back to the bytes they stand for;
    - SentencePiece: "▁" is a space and "<0x0A>" is the byte 0x0A (byte fallback);
    - a special token stands for its own text (a literal "<|endoftext|>" in the corpus).
    data/prepare.py checks that these bytes rebuild the corpus, so a tokenizer of another
    kind is refused there rather than giving a wrong bits per byte.
    """
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    char_to_byte = None
    if _is_byte_level(tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte <-> character map
        char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    table = []
    for i, piece in zip(ids, pieces):
        if piece is None:
            table.append(b"")
        elif i in special:
            table.append(piece.encode("utf-8"))
        elif char_to_byte is not None and all(c in char_to_byte for c in piece):
            table.append(bytes(char_to_byte[c] for c in piece))
        elif match := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece's piece for one byte
            table.append(bytes([int(match[1], 16)]))
        else:  # SentencePiece writes a space as "▁"
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    return table


# ----------------------------------------------------------------------------
# every tokenization: text -> ids, ids -> bytes

def _unknown(tokenization):
    return UserError(f"unknown tokenization {tokenization!r}: expected bytes, bpe, bytes_gpt2 or "
                     f"{HF_PREFIX}<tokenizer folder>")


def encode(tokenization, text):
    """Token ids of a string (a prompt), as data/prepare.py tokenizes it."""
    if tokenization == "bytes":
        return list(text.encode("utf-8"))
    if tokenization == "bpe":
        # encode_ordinary: a literal "<|endoftext|>" is plain text, as in the training data
        return gpt2_encoding().encode_ordinary(text)
    if tokenization == "bytes_gpt2":
        return mark_gpt2_token_ends(text.encode("utf-8")).tolist()
    if tokenization.startswith(HF_PREFIX):
        return load_hf_tokenizer(tokenization[len(HF_PREFIX):]).encode(text, add_special_tokens=False)
    raise _unknown(tokenization)


@functools.lru_cache(maxsize=4)
def token_byte_table(tokenization):
    """The byte string of every token id. Built once per process."""
    if tokenization == "bytes":
        return [bytes([i]) for i in range(BYTE_VOCAB)]
    if tokenization == "bpe":
        encoding = gpt2_encoding()
        return [encoding.decode_single_token_bytes(i) for i in range(encoding.n_vocab)]
    if tokenization == "bytes_gpt2":
        return [bytes([i]) for i in range(BYTE_VOCAB)] + [b""]  # the marker stands for no text
    if tokenization.startswith(HF_PREFIX):
        return hf_token_bytes(load_hf_tokenizer(tokenization[len(HF_PREFIX):]))
    raise _unknown(tokenization)


def unit_to_bytes(tokenization):
    """A function from one generated token id to its bytes."""
    table = token_byte_table(tokenization)
    return lambda unit: table[unit.item()]


# ----------------------------------------------------------------------------
# bytes_gpt2: GPT-2's token ends written into the byte stream

@functools.lru_cache(maxsize=1)
def _gpt2_token_lengths():
    encoding = gpt2_encoding()
    lengths = [len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]
    return np.array(lengths, dtype=np.int64)


# bytes that are not UTF-8 decode to lone surrogates under "surrogateescape", one per byte
_ESCAPED_BYTE = re.compile("([\udc80-\udcff])")


def gpt2_lengths(data):
    """
    The byte length of each GPT-2 token of data. tiktoken takes text, not bytes, so the
    bytes are decoded with each invalid byte kept as an escape: valid runs are tokenized,
    and each invalid byte is a token of its own. The lengths add up to the run's because
    GPT-2's BPE is byte-level and lossless.
    """
    encoding, token_lengths = gpt2_encoding(), _gpt2_token_lengths()
    lengths = []
    for piece in _ESCAPED_BYTE.split(data.decode("utf-8", errors="surrogateescape")):
        if _ESCAPED_BYTE.fullmatch(piece):
            lengths.append([1])
        elif piece:
            lengths.append(token_lengths[encoding.encode_ordinary(piece)])
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def mark_gpt2_token_ends(data):
    """
    bytes_gpt2: the bytes (uint16) with GPT2_TOKEN_END after each GPT-2 token's
    bytes. Lossless: dropping the markers gives the bytes back.
    """
    data = bytes(data)
    values = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    return np.insert(values, np.cumsum(gpt2_lengths(data)), GPT2_TOKEN_END)


# ----------------------------------------------------------------------------
# a teaching BPE (EXERCISES.md, exercise 16): how a byte-level BPE learns its merges and how it
# encodes with them. The project's BPE is tiktoken's gpt2 above, never this one; the tests check
# this encoder against tiktoken's, run on the ranks this trainer learns.

# GPT-2's pre-tokenization with ASCII classes (Python's re has no \p{L}): text is cut into pieces
# (a word with its leading space, a number, punctuation, spaces) and no merge crosses a piece
BPE_PIECES = r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""


def join_pair(tokens, pair):
    """tokens (a tuple of bytes) with each occurrence of pair, left to right, joined into one token."""
    joined, i = [], 0
    while i < len(tokens):
        if tokens[i:i + 2] == pair:
            joined.append(pair[0] + pair[1])
            i += 2
        else:
            joined.append(tokens[i])
            i += 1
    return tuple(joined)


def train_bpe(text, n_merges):
    """
    The ranks a byte-level BPE learns from text in n_merges merges: {token's bytes: id}, the 256
    single bytes first (id = the byte's value), then each merge's token in the order learnt. A
    merge joins the adjacent pair of tokens seen most often within text's pieces (BPE_PIECES),
    ties going to the greatest pair (compared as (bytes, bytes), as CS336 does), everywhere at once;
    a pair whose bytes are a token already joins into that token, and gets no new id.
    """
    ranks = {bytes([b]): b for b in range(BYTE_VOCAB)}
    # each distinct piece once, as its tokens, with the number of times it occurs
    pieces = {}
    for piece in re.findall(BPE_PIECES, text):
        tokens = tuple(bytes([b]) for b in piece.encode("utf-8"))
        pieces[tokens] = pieces.get(tokens, 0) + 1
    for _ in range(n_merges):
        pairs = {}
        for tokens, count in pieces.items():
            for pair in zip(tokens, tokens[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break  # every piece is one token: nothing left to merge
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        ranks.setdefault(best[0] + best[1], len(ranks))
        pieces = {join_pair(tokens, best): count for tokens, count in pieces.items()}
    return ranks


def bpe_encode(text, ranks):
    """
    The token ids of text under ranks, as tiktoken encodes: piece by piece (BPE_PIECES); a piece
    that is a token whole is that token; otherwise its bytes are joined, one pair at a time, at
    the adjacent pair whose joined bytes have the lowest rank (the leftmost of equals), until no
    adjacent pair joins into a token.
    """
    ids = []
    for piece in re.findall(BPE_PIECES, text):
        data = piece.encode("utf-8")
        if data in ranks:
            ids.append(ranks[data])
            continue
        tokens = [bytes([b]) for b in data]
        while len(tokens) > 1:
            candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(tokens, tokens[1:])) if a + b in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            tokens[i:i + 2] = [tokens[i] + tokens[i + 1]]
        ids += [ranks[token] for token in tokens]
    return ids
