"""
Tokenization: how text becomes the numbers a model reads, and back.

Every dataset in this project is one of these tokenizations of the same bytes:

- `bytes`       one token per byte: vocabulary 256, nothing to learn, nothing lost.
- `bpe`         GPT-2's byte-level BPE through tiktoken: 50,257 tokens of about 3-4 bytes each.
- `bytes_gpt2`  the bytes, with an end marker (id 256, no bytes of text) after each GPT-2 token:
                vocabulary 257. GPT-2's cuts written into a byte stream, for a pooled model
                that pools by GPT-2 tokens (byte_tokenizer.py says why they must be in the data).
- `hf:DIR`      a Hugging Face tokenizer from a local folder or .gguf file (a distillation teacher's).

A pooled byte model (byte_tokenizer.py) reads `bytes` data and cuts it into *chunks* itself
(or, on `bytes_gpt2` data, at the markers).
The segmenters here cut text the same ways (GPT-2 tokens, SpaceByte's spacelike rule,
every N bytes) with a lossless codec for any bytes: the model's rules are tested against
them, and `python byte_tokenizer.py "text"` shows where each rule cuts.

Each token id stands for a fixed byte string (`token_byte_table`): that is how generated
ids become text, and how many bytes of text a predicted token covers, the denominator of
bits per byte. data/prepare.py stores the lengths beside the data (token_bytes.npy), so
training needs no tokenizer to report bits per byte.

No torch in this file: data/prepare.py imports it without loading the model.

    python -c "import tokenizer; print(tokenizer.Segmenter('space').split('Hello, world!'))"
"""

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli import UserError

BYTE_VOCAB = 256  # the byte vocabulary: one token per byte value
GPT2_ENCODING = "gpt2"  # tiktoken's name for GPT-2's BPE
GPT2_VOCAB = 50257  # its vocabulary: 50,000 merges, 256 bytes and <|endoftext|>
HF_PREFIX = "hf:"  # "hf:<folder>" names a Hugging Face tokenization in meta.json
TOKENIZATIONS = ("bytes", "bpe", "bytes_gpt2", "hf")
GPT2_TOKEN_END = BYTE_VOCAB  # bytes_gpt2: the id after each GPT-2 token's bytes
TOKEN_BYTES_NAME = "token_bytes.npy"  # beside a prepared dataset: the bytes of text each token id stands for

# chunks of bytes (byte_tokenizer.py): how text is cut
SEGMENTERS = ("gpt2", "space", "fixed")
MAX_CHUNK_BYTES = 16  # longer chunks are split; 99.9% of GPT-2 tokens in English text are shorter
FIXED_CHUNK_BYTES = 4  # the fixed segmenter's chunk size: about a GPT-2 token's mean length in English


# ----------------------------------------------------------------------------
# GPT-2's BPE (tiktoken) and Hugging Face tokenizers

@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's GPT-2 encoding, with a one-line error when its files cannot be had (offline, no cache)."""
    import tiktoken  # only BPE and the gpt2 segmenter need it
    try:
        return tiktoken.get_encoding(GPT2_ENCODING)
    except Exception as e:  # requests' connection errors, or a corrupt cache
        raise UserError(f"could not load tiktoken's {GPT2_ENCODING} encoding ({type(e).__name__}): it downloads its "
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


SENTENCEPIECE_SPACE = "\u2581"  # "▁": SentencePiece writes a space as this character
BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's piece for one raw byte


def _is_byte_level(tokenizer):
    """Byte-level BPE (GPT-2, SmolLM2) writes every byte as one printable character and decodes with ByteLevel."""
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
        elif match := BYTE_FALLBACK_PIECE.fullmatch(piece):
            table.append(bytes([int(match[1], 16)]))
        else:
            table.append(piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8"))
    return table


# ----------------------------------------------------------------------------
# every tokenization: text -> ids, ids -> bytes

def _unknown(tokenization):
    return UserError(f"unknown tokenization {tokenization!r}: expected bytes, bpe, bytes_gpt2 or "
                     f"{HF_PREFIX}<tokenizer folder>")


def encode(tokenization, text):
    """
    Token ids of a string (a prompt), as data/prepare.py tokenizes it.
    """
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
# segmenters: bytes -> chunk lengths

@functools.lru_cache(maxsize=1)
def _gpt2_token_lengths():
    encoding = gpt2_encoding()
    return np.array([len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)], dtype=np.int64)


# bytes that are not UTF-8 decode to lone surrogates under "surrogateescape", one per byte
_ESCAPED_BYTE = re.compile("([\udc80-\udcff])")


def gpt2_lengths(data):
    """
    One chunk per GPT-2 token. tiktoken takes text, not bytes, so the bytes are
    decoded with each invalid byte kept as an escape: valid runs are tokenized,
    and each invalid byte becomes a chunk of its own. Token byte lengths add up
    to the run's length because GPT-2's BPE is byte-level and lossless.
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


def is_spacelike(values):
    """SpaceByte's test, per byte: not an ASCII letter or digit, and not a UTF-8 continuation byte."""
    letter_or_digit = ((values >= ord("a")) & (values <= ord("z"))) | ((values >= ord("A")) & (values <= ord("Z"))) \
        | ((values >= ord("0")) & (values <= ord("9")))
    continuation = (values & 0b1100_0000) == 0b1000_0000
    return ~(letter_or_digit | continuation)


def space_lengths(data):
    """SpaceByte's rule: a chunk closes after a spacelike byte unless the byte before it was spacelike too."""
    values = np.frombuffer(data, dtype=np.uint8)
    spacelike = is_spacelike(values)
    after_spacelike = np.concatenate([[False], spacelike[:-1]])  # the first byte has nothing before it
    ends = np.flatnonzero(spacelike & ~after_spacelike) + 1
    return np.diff(np.unique(np.concatenate([[0], ends, [len(values)]])))


def fixed_lengths(data, size):
    """Every `size` bytes; the last chunk holds what is left."""
    full, rest = divmod(len(data), size)
    return np.array([size] * full + ([rest] if rest else []), dtype=np.int64)


def split_long(lengths, max_len):
    """Cut every chunk longer than max_len into pieces of max_len and a remainder: nothing is dropped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pieces = -(-lengths // max_len)  # ceiling division
    out = np.full(int(pieces.sum()), max_len, dtype=np.int64)
    out[np.cumsum(pieces) - 1] = lengths - (pieces - 1) * max_len  # each chunk's last piece
    return out


@dataclass(frozen=True)
class Segmenter:
    name: str = "gpt2"  # gpt2 | space | fixed
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    fixed_chunk_bytes: int = FIXED_CHUNK_BYTES

    def __post_init__(self):
        if self.name not in SEGMENTERS:
            raise UserError(f"--segmenter={self.name} is not one of {', '.join(SEGMENTERS)}")
        if self.max_chunk_bytes < 1 or self.fixed_chunk_bytes < 1:
            raise UserError("--max_chunk_bytes and --fixed_chunk_bytes must be at least 1")

    def lengths(self, data):
        """Chunk lengths (numpy int64, each in 1..max_chunk_bytes) that add up to len(data)."""
        data = bytes(data)
        if self.name == "gpt2":
            lengths = gpt2_lengths(data)
        elif self.name == "space":
            lengths = space_lengths(data)
        else:
            lengths = fixed_lengths(data, self.fixed_chunk_bytes)
        return split_long(lengths, self.max_chunk_bytes)

    def offsets(self, data):
        """Chunk boundaries: 0, the end of each chunk, ..., len(data)."""
        return np.concatenate([[0], np.cumsum(self.lengths(data))]).astype(np.int64)

    def split(self, data):
        """Text or bytes -> a list of chunks (bytes). join_chunks gives the same bytes back."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        offsets = self.offsets(data)
        return [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


# ----------------------------------------------------------------------------
# the codec: chunks back to bytes, losslessly

def join_chunks(chunks):
    return b"".join(chunks)
