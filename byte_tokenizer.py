"""
Byte-level tokenization with pooling: no 50k-row embedding table.

A text is a byte string. A *segmenter* (tokenizer.py) cuts it into chunks: a
GPT-2 token's bytes, a word and the space after it, or every P bytes. The
*pooling encoder* here turns each chunk's bytes into one vector for the
transformer core, and the *byte decoder head* turns the core's output at chunk
s into the bytes of chunk s + 1, one byte at a time and then an end-of-chunk
symbol. So the core runs over chunks, as a BPE model runs over tokens, while
the vocabulary is 256 bytes.

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

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError, parse_config, run
from tokenizer import (BYTE_VOCAB, FIXED_CHUNK_BYTES, GPT2_VOCAB, MAX_CHUNK_BYTES, PAD, SEGMENTERS, Segmenter,
                       join_chunks)

START_OF_CHUNK = BYTE_VOCAB  # decoder input symbol before a chunk's first byte
END_OF_CHUNK = BYTE_VOCAB  # decoder output symbol after a chunk's last byte
DECODER_SYMBOLS = BYTE_VOCAB + 1  # 256 bytes and one of the two symbols above
# default sizes of the encoder and decoder: small next to the core, and cheap, as they run on every byte
BYTE_WIDTH = 64
BYTE_HEADS = 2  # head size 32: fewer, wider heads run faster over such short sequences
ENCODER_LAYERS = 1
DECODER_LAYERS = 2
POOLINGS = ("mean", "attention")


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
        self.byte_embedding = nn.Embedding(BYTE_VOCAB, width)
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
    allowed[max_chunk_bytes, :BYTE_VOCAB] = False
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
        self.byte_embedding = nn.Embedding(BYTE_VOCAB + 1, width)  # + START_OF_CHUNK
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
        try:
            chunks = segmenter.split(data)
        except UserError as e:  # gpt2 offline without tiktoken's files: show the others
            print(f"{name:>6}: unavailable ({e})")
            continue
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
