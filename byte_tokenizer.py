"""
Byte-level pooling in one flat byte stream: no 50k-row embedding table, and
the big transformer core runs once per chunk of bytes, not once per byte.

The design is SpaceByte's (Slagle 2024), which beats both byte-level and BPE
transformers at equal compute:

    bytes ──> embedding ──> local layers (in) ──┬──> + ──> local layers (out) ──> next-byte logits
                                                │    ^
                              at chunk ends: up ─> core (model.py's GPT blocks) ─> down

- Every byte goes through a few *narrow local layers* (width byte_width) with
  causal attention over a sliding window of the last byte_window bytes.
- At the last byte of each chunk (a *chunk end*) that byte's vector is
  projected up to the core's width, and the core, the project's own GPT
  blocks, runs over the chunk ends only: a sequence 3-6x shorter than the
  bytes, so the core can be wider or deeper at the same cost.
- The core's output is projected down and added back into the byte stream at
  the same chunk-end positions; more local layers then predict every next
  byte. So a byte prediction sees the actual bytes before it (the local path)
  and everything the core made of the chunks so far.

The loss is plain next-byte cross-entropy over every byte, the same unit as a
`bytes` model's, and the probability of a text is the product of its bytes'
probabilities: a proper distribution over byte strings, so bits per byte
compares directly with `bytes` and `bpe` models (train.evaluate). The data is
plain bytes (data/prepare.py's default tokenization); the model finds the
chunk ends itself, from the bytes.

Which boundary rules are valid where. The model conditions on where chunks
end, so whether byte t ends a chunk must be decidable from bytes 0..t alone;
otherwise the prediction of byte t + 1 would leak information about it.
- `space` (SpaceByte's rule, tokenizer.is_spacelike): byte t ends a chunk if
  it is spacelike (not a letter, digit or UTF-8 continuation byte) and byte
  t - 1 is not; a chunk that reaches max_chunk_bytes ends there too. Both
  depend on the past only: valid.
- `fixed`: every fixed_chunk_bytes bytes, counted from the window's start:
  valid.
- `gpt2` (STLM's choice): a GPT-2 token's end depends on the bytes after it
  (BPE merges look ahead: whether "the" is a token or the start of "there"),
  so the model cannot find it from the bytes so far. It is made exact by
  writing the ends into the data: `python data/prepare.py
  --tokenization=bytes_gpt2` puts an end marker (id 256) after each GPT-2
  token's bytes, chunks end at the markers, and the model predicts a marker
  like any byte. It then models the text together with its GPT-2
  segmentation, and p(text, segmentation) <= p(text): its bits per byte (the
  markers' nats counted, their zero bytes of text not) is an upper bound on
  the text's code length, honest and a little pessimistic. Only on
  bytes_gpt2 data, and only this rule there. `python byte_tokenizer.py
  "text"` shows where each rule cuts.

Chunk ends are found within each window the model reads (the first byte of a
window has no byte before it), so a training window, an evaluation window and
a generation window all follow the same rule.

    python byte_tokenizer.py "some text"     # its chunks under each rule, and parameter counts
"""

import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError, parse_config, run
from tokenizer import (BYTE_VOCAB, FIXED_CHUNK_BYTES, GPT2_TOKEN_END, GPT2_VOCAB, MAX_CHUNK_BYTES, SEGMENTERS,
                       Segmenter, is_spacelike, join_chunks)

BOUNDARIES = ("space", "fixed", "gpt2")  # the rules a flat byte model may condition on (see above)
MARKED_VOCAB = GPT2_TOKEN_END + 1  # bytes_gpt2 data: 256 bytes and the end marker
# default sizes of the local byte layers: narrow next to the core, as they run on every byte
BYTE_WIDTH = 64
BYTE_HEADS = 2  # head size 32: fewer, wider heads run faster over short windows
BYTE_LAYERS_IN = 2  # local layers before the core
BYTE_LAYERS_OUT = 2  # local layers after it
BYTE_WINDOW = 64  # bytes each local layer attends to: about ten words back


def check_data(boundary, vocab_size):
    """Each rule reads its own data: GPT-2 ends only from bytes_gpt2's markers, the others from plain bytes."""
    if boundary == "gpt2" and vocab_size != MARKED_VOCAB:
        raise UserError("--boundary=gpt2 needs GPT-2's token ends written into the data (they depend on the bytes "
                        "after them, so the model cannot find them): python data/prepare.py --tokenization=bytes_gpt2")
    if boundary != "gpt2" and vocab_size != BYTE_VOCAB:
        marked = " (bytes_gpt2 data pools with --boundary=gpt2)" if vocab_size == MARKED_VOCAB else ""
        raise UserError(f"a pooled model with --boundary={boundary} reads bytes, but the data has {vocab_size} token "
                        f"ids{marked}: prepare it with python data/prepare.py --tokenization=bytes")


# ----------------------------------------------------------------------------
# where chunks end, from the bytes seen so far

def chunk_ends(idx, boundary, max_chunk_bytes=MAX_CHUNK_BYTES, fixed_chunk_bytes=FIXED_CHUNK_BYTES):
    """
    (B, T) bool: True where byte t is the last byte of a chunk, from bytes
    0..t only. The same cuts as tokenizer.Segmenter(boundary, ...) makes of
    the window (a test checks it), except that the window's last byte is an
    end only if the rule says so. Under gpt2 the markers are the ends.
    """
    if boundary == "gpt2":
        return idx == GPT2_TOKEN_END
    B, T = idx.shape
    t = torch.arange(T, device=idx.device)
    if boundary == "fixed":
        return ((t + 1) % fixed_chunk_bytes == 0).expand(B, T)
    spacelike = is_spacelike(idx)
    after_spacelike = F.pad(spacelike[:, :-1], (1, 0), value=False)  # the first byte has nothing before it
    natural = spacelike & ~after_spacelike
    # a chunk that reaches max_chunk_bytes ends there: every max_chunk_bytes bytes after the last natural end
    last_natural = torch.where(natural, t, -1).cummax(dim=1).values  # at or before t
    before = F.pad(last_natural[:, :-1], (1, 0), value=-1)  # strictly before t
    return natural | ((t - before) % max_chunk_bytes == 0)


# ----------------------------------------------------------------------------
# the local layers: narrow, causal, over a sliding window of bytes

def window_mask(T, start, window, device):
    """
    (T, start + T) bool: byte start + i sees byte j if j <= start + i and it is
    less than window bytes back. A dense mask: the window bounds what a byte
    sees, not the work (at a context of a few hundred bytes, attention is a
    small share of a byte layer's cost; a blocked kernel would save the rest).
    """
    query = torch.arange(start, start + T, device=device)[:, None]
    key = torch.arange(start + T, device=device)
    return (key <= query) & (query - key < window)


class ByteBlock(nn.Module):
    """A pre-norm transformer block over bytes; the mask says who sees whom."""

    def __init__(self, width, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.attn_out = nn.Linear(width, width, bias=False)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x, mask, cache=None):
        """
        x (B, T, width); mask (T, S): the S keys are the cached ones and these T.
        cache: None, or a list, empty or [k, v], that this call extends in place.
        """
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, T, C))
        return x + self.proj(F.relu(self.fc(self.ln_2(x))).square())  # ReLU squared, as cpu-tiny's core


# ----------------------------------------------------------------------------
# the pooled byte model around the core

class PooledCache:
    """
    What generation keeps between bytes: the window's bytes (to find chunk
    ends) and where chunks ended, each local layer's keys and values, and the
    core's own cache of chunk positions. length counts bytes; setting it
    lower forgets the bytes after (0 starts over; bench.py rewinds a step).
    """

    def __init__(self, core_cache, n_local_layers):
        if core_cache.k.size(1) != 1:
            raise UserError("a pooled model generates one sequence at a time with the KV cache (rows reach chunk "
                            "ends at different bytes): use batch size 1, or use_cache=False")
        self.core = core_cache
        self.local = [[] for _ in range(n_local_layers)]
        self.bytes = self.ends = None

    @property
    def length(self):
        return 0 if self.bytes is None else self.bytes.size(1)

    @length.setter
    def length(self, value):
        if not 0 <= value <= self.length:
            raise ValueError(f"a pooled cache of {self.length} bytes cannot grow to {value} without them")
        if value == 0:
            self.bytes = self.ends = None
            self.local = [[] for _ in self.local]
        else:
            self.bytes, self.ends = self.bytes[:, :value], self.ends[:, :value]
            self.local = [[k[:, :, :value], v[:, :, :value]] for k, v in self.local]
        self.core.length = 0 if value == 0 else int(self.ends.sum())


class PooledBytes(nn.Module):
    """
    Bytes (B, T) in, final byte states (B, T, width) out; the caller's core
    (a function from (B, S, n_embd) vectors and its cache to (B, S, n_embd),
    GPT.core) runs at the chunk ends. The head is the byte embedding, tied.
    """

    def __init__(self, n_embd, block_size, width=BYTE_WIDTH, n_head=BYTE_HEADS, layers_in=BYTE_LAYERS_IN,
                 layers_out=BYTE_LAYERS_OUT, window=BYTE_WINDOW, boundary="space", max_chunk_bytes=MAX_CHUNK_BYTES,
                 fixed_chunk_bytes=FIXED_CHUNK_BYTES, vocab_size=BYTE_VOCAB):
        super().__init__()
        self.window, self.boundary = window, boundary
        self.max_chunk_bytes, self.fixed_chunk_bytes = max_chunk_bytes, fixed_chunk_bytes
        self.byte_embedding = nn.Embedding(vocab_size, width)  # 256 bytes (and bytes_gpt2's end marker)
        self.position = nn.Embedding(block_size, width)
        self.layers_in = nn.ModuleList([ByteBlock(width, n_head) for _ in range(layers_in)])
        self.up = nn.Linear(width, n_embd, bias=False)  # a chunk end's byte state -> the core's input
        self.down = nn.Linear(n_embd, width, bias=False)  # the core's output -> added to that byte's state
        self.layers_out = nn.ModuleList([ByteBlock(width, n_head) for _ in range(layers_out)])
        self.ln = nn.LayerNorm(width)

    def ends(self, idx):
        return chunk_ends(idx, self.boundary, self.max_chunk_bytes, self.fixed_chunk_bytes)

    def forward(self, idx, core, cache=None):
        """Final byte states (B, T, width) of bytes idx (B, T), continuing cache (a PooledCache) if given."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        seen = idx if cache is None else torch.cat([x for x in (cache.bytes, idx) if x is not None], dim=1)
        all_ends = self.ends(seen)  # decided from the bytes so far, never the ones after
        if cache is not None:
            cache.bytes, cache.ends = seen, all_ends
        ends = all_ends[:, start:]
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.byte_embedding(idx) + self.position(positions)
        mask = window_mask(T, start, self.window, idx.device)
        for i, block in enumerate(self.layers_in):
            x = block(x, mask, None if cache is None else cache.local[i])
        x = x + self.run_core(x, ends, core, None if cache is None else cache.core)
        for i, block in enumerate(self.layers_out, start=len(self.layers_in)):
            x = block(x, mask, None if cache is None else cache.local[i])
        return self.ln(x)

    def run_core(self, x, ends, core, core_cache=None):
        """
        The core's contribution (B, T, width): its outputs at the chunk ends,
        zero elsewhere. Rows hold different numbers of chunk ends; each row's
        ends are gathered in order into (B, S) slots, S the most in any row, and
        the spare slots after a row's last end run through the core unread
        (the core is causal, so they change nothing before them).
        """
        B, T, C = x.shape
        counts = ends.sum(dim=1)
        S = int(counts.max()) if B else 0
        if S == 0:
            return torch.zeros_like(x)
        t = torch.arange(T, device=x.device)
        order = torch.where(ends, t, T + t).argsort(dim=1)[:, :S]  # each row's end positions first, in order
        used = (torch.arange(S, device=x.device) < counts[:, None])[..., None]
        gather = order[..., None].expand(B, S, C)
        y = self.down(core(self.up(x.gather(1, gather)), core_cache)) * used
        return torch.zeros_like(x).scatter_add(1, gather, y)


# ----------------------------------------------------------------------------
# parameter counts

def pooled_parameters(n_embd, block_size, **sizes):
    """Parameters of everything around the core (embedding, local layers, projections; the head is tied)."""
    return sum(p.numel() for p in PooledBytes(n_embd, block_size, **sizes).parameters())


# ----------------------------------------------------------------------------

@dataclass
class ShowConfig:
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    fixed_chunk_bytes: int = FIXED_CHUNK_BYTES
    n_embd: int = 128  # the core's width (cpu-tiny)
    block_size: int = 256  # bytes of context
    byte_width: int = BYTE_WIDTH
    byte_heads: int = BYTE_HEADS
    byte_layers_in: int = BYTE_LAYERS_IN
    byte_layers_out: int = BYTE_LAYERS_OUT


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
        use = "looks ahead: read from bytes_gpt2 data's markers" if name == "gpt2" else "found from the past"
        print(f"{name:>6}: {len(chunks)} chunks, {len(data) / max(1, len(chunks)):.2f} bytes each ({use}): "
              + " | ".join(repr(c)[2:-1] for c in chunks))
    pooled = pooled_parameters(config.n_embd, config.block_size, width=config.byte_width, n_head=config.byte_heads,
                               layers_in=config.byte_layers_in, layers_out=config.byte_layers_out)
    tied = GPT2_VOCAB * config.n_embd
    print(f"pooled byte layers around a core of width {config.n_embd}: {pooled:,} parameters; "
          f"a tied GPT-2 embedding ({GPT2_VOCAB:,} x {config.n_embd}): {tied:,} ({pooled / tied:.1%} of it)")


if __name__ == "__main__":
    run(main)
