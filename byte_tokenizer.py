"""
Byte-level tokenization with pooling: no 50k-row embedding table.

A text is a byte string. A *segmenter* cuts it into chunks (a GPT-2 token's
bytes, a word and the space after it, or every P bytes). The *pooling encoder*
turns each chunk's bytes into one vector for the transformer core, and the
*byte decoder head* turns the core's output at chunk s into the bytes of chunk
s + 1, one byte at a time and then an end-of-chunk symbol. So the core runs
over chunks, as a BPE model runs over tokens, while the vocabulary is 256 bytes.

STLM's own code (Hillier et al., 2024) pools at GPT-2 token boundaries, cuts
every token to 12 bytes, averages over padding too, and predicts the 12 bytes
of the next token in parallel. Here instead:
- a chunk longer than max_chunk_bytes is split, never truncated, and the codec
  is lossless for any bytes (invalid UTF-8, characters split across chunks, NUL);
- padding is masked out of the encoder's attention and out of the pooling;
- the decoder is autoregressive within the chunk and ends it with its own
  symbol, so every byte string gets a proper probability, and
- the loss counts nats over every predicted byte and end-of-chunk symbol, so
  bits per byte compares directly with BPE and plain byte models.

    python byte_tokenizer.py "some text"     # its chunks under each segmenter, and parameter counts

Layout of a batch: chunks are rows of byte values padded with PAD (-1), shape
(batch, chunks, width) with width <= max_chunk_bytes, like token ids (batch,
tokens) with one more axis.
"""

import functools
import math
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError, parse_config, run

BYTE_VALUES = 256  # the byte vocabulary
START_OF_CHUNK = BYTE_VALUES  # decoder input symbol before a chunk's first byte
END_OF_CHUNK = BYTE_VALUES  # decoder output symbol after a chunk's last byte
DECODER_SYMBOLS = BYTE_VALUES + 1  # 256 bytes and one of the two symbols above
PAD = -1  # padding in a batch of chunks; also ignored by the loss
MAX_CHUNK_BYTES = 16  # longer chunks are split; 99.9% of GPT-2 tokens in English text are shorter
FIXED_CHUNK_BYTES = 4  # the fixed segmenter's chunk size: about a GPT-2 token's mean length in English
# default sizes of the encoder and decoder: small next to the core, and cheap, as they run on every byte
BYTE_WIDTH = 64
BYTE_HEADS = 2  # head size 32: fewer, wider heads run faster over such short sequences
ENCODER_LAYERS = 1
DECODER_LAYERS = 2
SEGMENTERS = ("gpt2", "space", "fixed")
POOLINGS = ("mean", "attention")
GPT2_ENCODING = "gpt2"
GPT2_VOCAB = 50257  # the tied embedding the pooled embedder replaces has this many rows
OFFSETS_DTYPE = "uint32"  # chunk boundaries on disk: byte offsets up to 4 GiB


# ----------------------------------------------------------------------------
# segmenters: bytes -> chunk lengths

@functools.lru_cache(maxsize=1)
def _gpt2():
    """tiktoken's GPT-2 encoding and the byte length of each of its tokens."""
    import tiktoken  # only the gpt2 segmenter needs it
    try:
        encoding = tiktoken.get_encoding(GPT2_ENCODING)
    except OSError as e:  # offline without a cache
        raise UserError(f"could not load tiktoken's {GPT2_ENCODING} encoding ({type(e).__name__}); offline, "
                        "set TIKTOKEN_CACHE_DIR to a folder holding its files") from None
    lengths = np.array([len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)], dtype=np.int64)
    return encoding, lengths


# bytes that are not UTF-8 decode to lone surrogates under "surrogateescape", one per byte
_ESCAPED_BYTE = re.compile("([\udc80-\udcff])")


def gpt2_lengths(data):
    """
    One chunk per GPT-2 token. tiktoken takes text, not bytes, so the bytes are
    decoded with each invalid byte kept as an escape: valid runs are tokenized,
    and each invalid byte becomes a chunk of its own. Token byte lengths add up
    to the run's length because GPT-2's BPE is byte-level and lossless.
    """
    encoding, token_lengths = _gpt2()
    lengths = []
    for piece in _ESCAPED_BYTE.split(data.decode("utf-8", errors="surrogateescape")):
        if _ESCAPED_BYTE.fullmatch(piece):
            lengths.append([1])
        elif piece:
            lengths.append(token_lengths[encoding.encode_ordinary(piece)])
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


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

    def to_meta(self):
        return {"segmenter": self.name, "max_chunk_bytes": self.max_chunk_bytes,
                "fixed_chunk_bytes": self.fixed_chunk_bytes}

    @classmethod
    def from_meta(cls, meta):
        return cls(meta["segmenter"], meta["max_chunk_bytes"], meta["fixed_chunk_bytes"])


# ----------------------------------------------------------------------------
# the codec: chunks <-> bytes <-> padded rows

def join_chunks(chunks):
    return b"".join(chunks)


def pad_chunks(chunks, width):
    """Chunks (bytes) -> int16 array (n, width) of byte values, padded with PAD."""
    rows = np.full((len(chunks), width), PAD, dtype=np.int16)
    for row, chunk in zip(rows, chunks):
        row[:len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
    return rows


def chunk_bytes(row):
    """One padded row (a tensor or array of byte values) -> the chunk's bytes."""
    values = np.asarray(row.cpu() if torch.is_tensor(row) else row).reshape(-1)
    return bytes(values[values >= 0].astype(np.uint8).tolist())


class ChunkedBytes:
    """
    One split of pooled data: the raw bytes and the chunk offsets into them.
    Indexed by chunk like a token array: data[idx] with an integer array idx of
    any shape gives idx.shape + (width,) byte values padded with PAD, where
    width is the longest chunk picked (no compute is spent on all-padding
    columns). So train.py's batching and evaluation index it like tokens.
    """

    def __init__(self, data, offsets, max_chunk_bytes):
        self.data, self.offsets, self.max_chunk_bytes = data, offsets, max_chunk_bytes

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, idx):
        starts = self.offsets[idx].astype(np.int64)
        lengths = self.offsets[idx + 1].astype(np.int64) - starts
        width = max(1, int(lengths.max(initial=0)))
        column = np.arange(width)
        inside = column < lengths[..., None]
        positions = np.where(inside, starts[..., None] + column, 0)
        return np.where(inside, self.data[positions].astype(np.int16), PAD)  # int16 first: PAD is not a uint8


# ----------------------------------------------------------------------------
# the byte transformer both the encoder and the decoder are made of
#
# Chunks vary in length (GPT-2 tokens in English: 1 to 16 bytes, about 3 on
# average), so a padded (chunks, longest) layout would spend most of its work
# on padding. Every position-wise layer (projections, MLP, norms, the head)
# therefore runs on the real positions only, packed into one (P, width)
# tensor; only attention, which mixes positions within a chunk, unpacks them
# into the padded layout. `real` (N, L) says where each packed row sits.

def unpack(packed, real, fill=0.0):
    """(P, ...) rows of the real positions -> (N, L, ...) padded with fill."""
    padded = packed.new_full((*real.shape, *packed.shape[1:]), fill)
    padded[real] = packed
    return padded


class ByteBlock(nn.Module):
    """A pre-norm transformer block over the bytes of each chunk. The caller says who attends to whom."""

    def __init__(self, width, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.attn_out = nn.Linear(width, width, bias=False)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x, real, causal=False):
        """
        x (P, width) packed real positions. causal: position i sees positions
        <= i (the real ones are a prefix of each row, so padding stays unseen);
        otherwise every real position sees every real position of its chunk.
        """
        (N, L), C = real.shape, x.size(-1)
        qkv = unpack(self.qkv(self.ln_1(x)), real)
        q, k, v = qkv.view(N, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        mask = None if causal else real[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        x = x + self.attn_out(y.transpose(1, 2).reshape(N, L, C)[real])
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------
# the pooling encoder: a chunk's bytes -> one vector for the core

class PooledEmbedder(nn.Module):
    """
    Byte embedding + position within the chunk, a small bidirectional
    transformer over the chunk's real bytes, then a masked mean (or a learned
    attention) over them, projected to the core's width.
    """

    def __init__(self, n_embd, width, n_head, n_layer, max_chunk_bytes, pooling="mean"):
        super().__init__()
        self.byte_embedding = nn.Embedding(BYTE_VALUES, width)
        self.position = nn.Embedding(max_chunk_bytes, width)
        self.blocks = nn.ModuleList([ByteBlock(width, n_head) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(width)
        # attention pooling scores each byte against a learned query; zero at the start, so it begins as the mean
        self.query = nn.Parameter(torch.zeros(width)) if pooling == "attention" else None
        self.proj = nn.Linear(width, n_embd)

    def forward(self, chunks):
        """chunks (B, T, L) byte values padded with PAD -> (B, T, n_embd)."""
        return self.pool(chunks, chunks >= 0)

    def pool(self, values, mask):
        """values (B, T, L) and mask (B, T, L), True for a chunk's bytes: what a padded position holds is never read."""
        B, T, L = values.shape
        real = mask.flatten(0, 1)
        positions = torch.arange(L, device=values.device).expand(B * T, L)
        x = self.byte_embedding(values.flatten(0, 1)[real]) + self.position(positions[real])
        for block in self.blocks:
            x = block(x, real)
        x = self.ln(x)
        if self.query is None:
            weights = 1.0 / real.sum(-1, keepdim=True).clamp(min=1).expand(B * T, L)[real]
        else:
            scores = unpack(x @ self.query / math.sqrt(x.size(-1)), real, float("-inf"))
            weights = scores.softmax(-1)[real]
        rows = torch.arange(B * T, device=values.device)[:, None].expand(B * T, L)[real]  # the chunk of each position
        pooled = x.new_zeros(B * T, x.size(-1)).index_add(0, rows, weights[:, None] * x)
        return self.proj(pooled).view(B, T, -1)


# ----------------------------------------------------------------------------
# the byte decoder head: the core's output at chunk s -> the bytes of chunk s + 1

def allowed_symbols(max_chunk_bytes):
    """
    (max_chunk_bytes + 1, DECODER_SYMBOLS) bool: what may come at each position
    of a chunk. A chunk has 1..max_chunk_bytes bytes, so the first symbol is a
    byte and after max_chunk_bytes bytes only the end is possible. With these
    masks the decoder's probabilities over all chunks sum to exactly 1.
    """
    allowed = torch.ones(max_chunk_bytes + 1, DECODER_SYMBOLS, dtype=torch.bool)
    allowed[0, END_OF_CHUNK] = False
    allowed[max_chunk_bytes, :BYTE_VALUES] = False
    return allowed


def chunk_targets(chunks):
    """(B, T, L) chunks -> (B, T, L + 1) decoder targets: the bytes, END_OF_CHUNK, then PAD."""
    lengths = (chunks >= 0).sum(-1, keepdim=True)
    targets = torch.cat([chunks, chunks.new_full((*chunks.shape[:-1], 1), PAD)], dim=-1)
    return targets.scatter(-1, lengths, END_OF_CHUNK)


class ByteDecoder(nn.Module):
    """
    A small causal transformer conditioned on one core output: input
    START_OF_CHUNK, b1, ..., bL; output b1, ..., bL, END_OF_CHUNK. Trained on
    whole chunks at once by teacher forcing, sampled one byte at a time.
    """

    def __init__(self, n_embd, width, n_head, n_layer, max_chunk_bytes):
        super().__init__()
        self.max_chunk_bytes = max_chunk_bytes
        self.condition = nn.Linear(n_embd, width)
        self.byte_embedding = nn.Embedding(BYTE_VALUES + 1, width)  # + START_OF_CHUNK
        self.position = nn.Embedding(max_chunk_bytes + 1, width)
        self.blocks = nn.ModuleList([ByteBlock(width, n_head) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, DECODER_SYMBOLS, bias=False)  # 256 bytes + END_OF_CHUNK
        self.register_buffer("allowed", allowed_symbols(max_chunk_bytes), persistent=False)

    def forward(self, h, chunks):
        """
        Packed logits (P, DECODER_SYMBOLS) for the chunks (B, T, L), padded
        with PAD, that follow the core outputs h (B, T, n_embd). Position i of
        a chunk predicts its byte i + 1 (or the end) from the bytes before it;
        the P rows are the positions where chunk_targets(chunks) is not PAD, in
        order. unpack(logits, chunk_targets(chunks) >= 0) lays them out (B, T, L + 1, ...).
        """
        B, T, L = chunks.shape
        real = (chunk_targets(chunks) >= 0).flatten(0, 1)  # START_OF_CHUNK and the bytes: L + 1 positions
        start = torch.full((B * T, 1), START_OF_CHUNK, dtype=chunks.dtype, device=chunks.device)
        inputs = torch.cat([start, chunks.flatten(0, 1)], dim=-1)[real]
        positions = torch.arange(L + 1, device=chunks.device).expand(B * T, L + 1)[real]
        rows = torch.arange(B * T, device=chunks.device)[:, None].expand(B * T, L + 1)[real]
        # the core's output reaches every position of its chunk
        x = self.byte_embedding(inputs) + self.position(positions) + self.condition(h.flatten(0, 1))[rows]
        for block in self.blocks:
            x = block(x, real, causal=True)
        logits = self.head(self.ln(x))
        return logits.masked_fill(~self.allowed[positions], float("-inf"))

    @torch.no_grad()
    def sample(self, h, pick):
        """
        The chunk after core outputs h (B, n_embd), byte by byte: (B, 1,
        max_chunk_bytes) padded with PAD. pick(logits (B, DECODER_SYMBOLS))
        returns (B, 1) symbols: greedy, temperature, top-k, as the caller wants.
        """
        B = h.size(0)
        chunk = torch.full((B, self.max_chunk_bytes), PAD, dtype=torch.long, device=h.device)
        ended = torch.zeros(B, dtype=torch.bool, device=h.device)
        for i in range(self.max_chunk_bytes):
            # every row still open has i bytes: its last packed position is the next symbol's
            prefix = torch.where(ended[:, None], 0, chunk[:, :i])  # ended rows: any bytes, ignored
            logits = self(h[:, None], prefix[:, None]).view(B, i + 1, DECODER_SYMBOLS)[:, -1]
            symbol = pick(logits)[:, 0]
            ended |= symbol == END_OF_CHUNK
            chunk[:, i] = torch.where(ended, PAD, symbol)
            if ended.all():
                break
        return chunk[:, None]


def chunk_loss(logits, chunks, reduction="mean"):
    """
    Nats over every predicted byte and end-of-chunk symbol, from the decoder's
    packed logits: summed (reduction="sum"), or divided by the number of bytes
    ("mean": nats per byte of text, which is bits per byte times ln 2).
    """
    targets = chunk_targets(chunks)
    nats = F.cross_entropy(logits, targets[targets >= 0], reduction="sum")
    if reduction == "sum":
        return nats
    return nats / (chunks >= 0).sum().clamp(min=1)


# ----------------------------------------------------------------------------
# parameter counts

def pooled_parameters(n_embd, width, n_head, encoder_layers, decoder_layers, max_chunk_bytes, pooling="mean"):
    """Parameters of the pooled embedder + byte decoder for a core of width n_embd."""
    modules = (PooledEmbedder(n_embd, width, n_head, encoder_layers, max_chunk_bytes, pooling),
               ByteDecoder(n_embd, width, n_head, decoder_layers, max_chunk_bytes))
    return sum(p.numel() for m in modules for p in m.parameters())


# ----------------------------------------------------------------------------

@dataclass
class ShowConfig:
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    fixed_chunk_bytes: int = FIXED_CHUNK_BYTES
    n_embd: int = 128  # the core's width (cpu-tiny)
    byte_width: int = BYTE_WIDTH
    byte_heads: int = BYTE_HEADS
    encoder_layers: int = ENCODER_LAYERS
    decoder_layers: int = DECODER_LAYERS


DEFAULT_TEXT = "Super tiny models: naïve café, 東京, 🙂!"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config = ShowConfig()
    words = [a for a in argv if not a.startswith("--")]
    parse_config([config], [a for a in argv if a.startswith("--")],
                 usage='python byte_tokenizer.py "some text" [--key=value ...]')
    data = (" ".join(words) if words else DEFAULT_TEXT).encode("utf-8")
    print(f"{len(data)} bytes: {data!r}")
    for name in SEGMENTERS:
        segmenter = Segmenter(name, config.max_chunk_bytes, config.fixed_chunk_bytes)
        chunks = segmenter.split(data)
        assert join_chunks(chunks) == data  # the codec is lossless
        print(f"{name:>6}: {len(chunks)} chunks, {len(data) / max(1, len(chunks)):.2f} bytes each: "
              + " | ".join(repr(c)[2:-1] for c in chunks))
    pooled = pooled_parameters(config.n_embd, config.byte_width, config.byte_heads, config.encoder_layers,
                               config.decoder_layers, config.max_chunk_bytes)
    tied = GPT2_VOCAB * config.n_embd
    print(f"pooled embedder + byte decoder at width {config.n_embd}: {pooled:,} parameters; "
          f"a tied GPT-2 embedding ({GPT2_VOCAB:,} x {config.n_embd}): {tied:,} ({pooled / tied:.1%} of it)")


if __name__ == "__main__":
    run(main)
