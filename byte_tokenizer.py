"""
The pooled byte-level model: the embedder and head that model.py's GPT puts around its
transformer core when embedder=pooled. Turning text into token ids, for every
tokenization, is tokenizer.py's job.

No 50k-row embedding table, and the big core (model.py's GPT blocks) runs once per chunk
of bytes, not once per byte, in one flat byte stream, as in SpaceByte (Slagle 2024):

    bytes ─> embedding + n-grams ─> local layers ─┬──────────────────────> + ─> local layers ─> logits
                                                  └─> chunk means ─> core ─┘

The core runs once per chunk, on the mean of its bytes' states; its output is added to
every byte of the next chunk.

    python byte_tokenizer.py "some text"     # where each rule ends chunks, and parameter counts
"""

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError, parse_config, run
from tokenizer import BYTE_VOCAB, BYTES_GPT2_VOCAB, GPT2_TOKEN_END, GPT2_VOCAB, mark_gpt2_token_ends

# Where chunks may end. The model conditions on where chunks end, so whether byte t ends a
# chunk must be decidable from bytes 0..t alone: otherwise the prediction of byte t + 1 would
# learn something about byte t + 1 from the boundary. `space` and `fixed` are found from the
# past (chunk_ends). `gpt2` (STLM's choice) is not: whether "the" is a GPT-2 token or the
# start of "there" depends on the bytes after it. So bytes_gpt2 data carries the ends as
# markers, and the model predicts a marker like any byte (see check_config).
BOUNDARIES = ("space", "fixed", "gpt2")
MAX_CHUNK_BYTES = 16  # space: a longer chunk ends anyway; 99.9% of GPT-2 tokens in English text are shorter
FIXED_CHUNK_BYTES = 4  # fixed: about a GPT-2 token's mean length in English
# rows of each hashed n-gram table of a pooled model: a prime, so the hash spreads over all of them
POOLED_NGRAM_BUCKETS = 4093


def check_config(config):
    """
    A pooled model's settings against its data: GPT-2's ends only from bytes_gpt2's markers,
    the other boundaries only from plain bytes.
    """
    # On bytes_gpt2 data the model models the text together with its GPT-2 segmentation, and
    # p(text, segmentation) <= p(text): its bits per byte (the markers' nats counted, their zero
    # bytes of text not) bounds the text's code length from above, honest and a little pessimistic.
    if config.boundary == "gpt2" and config.vocab_size != BYTES_GPT2_VOCAB:
        raise UserError("--boundary=gpt2 needs GPT-2's token ends written into the data (they depend on "
                        "the bytes after them, so the model cannot find them): python data/prepare.py "
                        "--tokenization=bytes_gpt2")
    if config.boundary != "gpt2" and config.vocab_size != BYTE_VOCAB:
        on_marked = config.vocab_size == BYTES_GPT2_VOCAB
        marked = " (bytes_gpt2 data pools with --boundary=gpt2)" if on_marked else ""
        raise UserError(f"a pooled model with --boundary={config.boundary} reads bytes, but the data has "
                        f"{config.vocab_size} token ids{marked}: prepare it with python data/prepare.py")


# ----------------------------------------------------------------------------
# where chunks end, from the bytes seen so far

def is_spacelike(idx):
    """SpaceByte's test, per byte: not an ASCII letter or digit, and not a UTF-8 continuation byte."""
    letter = ((idx >= ord("a")) & (idx <= ord("z"))) | ((idx >= ord("A")) & (idx <= ord("Z")))
    digit = (idx >= ord("0")) & (idx <= ord("9"))
    continuation = (idx & 0b1100_0000) == 0b1000_0000
    return ~(letter | digit | continuation)


def chunk_ends(idx, boundary, max_chunk_bytes=MAX_CHUNK_BYTES, fixed_chunk_bytes=FIXED_CHUNK_BYTES):
    """
    (B, T) bool: True where byte t is the last byte of a chunk, decided from bytes 0..t only
    (the tests hold it against a plain loop over the bytes):
    - space (SpaceByte's rule): a spacelike byte that follows a byte that is not; and a chunk
      that reaches max_chunk_bytes ends there;
    - fixed: every fixed_chunk_bytes-th byte;
    - gpt2: the data's end markers.
    Ends are found within the window given (its first byte has no byte before it), so a
    training window, an evaluation window and a generation window all follow the same rule.
    """
    if boundary == "gpt2":
        return idx == GPT2_TOKEN_END
    B, T = idx.shape
    t = torch.arange(T, device=idx.device)
    if boundary == "fixed":
        return ((t + 1) % fixed_chunk_bytes == 0).expand(B, T)
    spacelike = is_spacelike(idx)
    after_spacelike = F.pad(spacelike[:, :-1], (1, 0), value=False)
    natural = spacelike & ~after_spacelike
    # max_chunk_bytes: an end every max_chunk_bytes bytes after the last natural end before t
    last_natural = torch.where(natural, t, -1).cummax(dim=1).values
    before = F.pad(last_natural[:, :-1], (1, 0), value=-1)
    return natural | ((t - before) % max_chunk_bytes == 0)


# ----------------------------------------------------------------------------
# the local layers: narrow, causal, over a sliding window of bytes

def window_mask(T, start, window, device):
    """
    (T, start + T) bool: byte start + i sees byte j if j <= start + i and it is less than
    window bytes back. A dense mask: the window bounds what a byte sees, not the work (at a
    context of a few hundred bytes, attention is a small share of a byte layer's cost).
    """
    query = torch.arange(start, start + T, device=device)[:, None]
    key = torch.arange(start + T, device=device)
    return (key <= query) & (query - key < window)


class ByteBlock(nn.Module):
    """A pre-norm transformer block over bytes (ReLU squared, as cpu-tiny's core); the mask says who sees whom."""

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
        return x + self.proj(F.relu(self.fc(self.ln_2(x))).square())


# ----------------------------------------------------------------------------
# the pooled byte model around the core

class NgramEmbedding(nn.Module):
    """
    Hashed byte n-grams (BLT): the 2-, 3- and 4-byte strings ending at each byte, each hashed
    into a table of `buckets` rows, their rows summed. Cheap extra capacity for a byte model,
    as a 50k-row table is for BPE; they read only the byte and the ones before it.
    """

    def __init__(self, buckets, width):
        super().__init__()
        self.buckets = buckets
        self.tables = nn.ModuleList([nn.Embedding(buckets, width) for _ in range(3)])

    def forward(self, idx):
        """(B, L, width) for byte ids idx (B, L); an n-gram that would start before idx is left out."""
        B, L = idx.shape
        code, out = idx.long(), 0
        for back, table in enumerate(self.tables, start=1):
            # the n-gram ending at t as a base-257 number (bytes and bytes_gpt2's marker are < 257)
            code = code + F.pad(idx.long(), (back, 0))[:, :L] * 257 ** back
            whole = torch.arange(L, device=idx.device) >= back
            out = out + table(code % self.buckets) * whole[:, None]
        return out


class PooledCache:
    """
    What generation keeps between bytes: the window's bytes (to find chunk ends), the local
    layers' keys and values, the byte states the core's inputs are pooled from, the core's
    outputs per chunk, and the core's own cache of chunk positions. length counts bytes;
    setting it lower forgets the bytes after (0 starts over; bench.py rewinds a step).
    """

    def __init__(self, core_cache, n_local_layers):
        if core_cache.k.size(1) != 1:
            raise UserError("a pooled model generates one sequence at a time with the KV cache (rows reach "
                            "chunk ends at different bytes): use batch size 1, or use_cache=False")
        self.core = core_cache
        self.local = [[] for _ in range(n_local_layers)]
        self.bytes = self.ends = self.states = self.core_out = None

    @property
    def length(self):
        return 0 if self.bytes is None else self.bytes.size(1)

    @length.setter
    def length(self, value):
        if not 0 <= value <= self.length:
            raise ValueError(f"a pooled cache of {self.length} bytes cannot grow to {value} without them")
        if value == 0:
            self.bytes = self.ends = self.states = self.core_out = None
            self.local = [[] for _ in self.local]
            self.core.length = 0
            return
        self.bytes, self.ends, self.states = self.bytes[:, :value], self.ends[:, :value], self.states[:, :value]
        self.local = [[k[:, :, :value], v[:, :, :value]] for k, v in self.local]
        self.core.length = int(self.ends.sum())
        self.core_out = self.core_out[:, :self.core.length]


class PooledBytes(nn.Module):
    """
    Bytes (B, T) in, final byte states (B, T, width) out; the caller's core (a function from
    (B, S, n_embd) vectors and its cache to (B, S, n_embd), GPT.core) runs once per chunk.

    Every byte goes through narrow local layers (width byte_width, attending to the last
    byte_window bytes), its hashed n-grams added first if ngram_buckets. At each chunk end the
    mean of the chunk's byte states is projected up to the core's width, and the core runs over
    the chunks only (a sequence 3-6x shorter than the bytes, so it can be wider or deeper at
    the same cost). Its output is projected down and added to every byte from the chunk's end
    to the next chunk's (Hourglass's upsampling): each of them predicts a byte of the next
    chunk. More local layers then predict every next byte. The loss is next-byte
    cross-entropy, the unit of a `bytes` model, and a text's probability is the product of its
    bytes': bits per byte compares directly across tokenizations.
    """

    def __init__(self, config):
        super().__init__()
        width, self.window, self.boundary = config.byte_width, config.byte_window, config.boundary
        # heads of 32 channels: fewer, wider heads run faster over short windows
        n_head = max(1, width // 32)
        # 256 bytes (and bytes_gpt2's end marker); GPT ties the head to this table
        self.byte_embedding = nn.Embedding(config.vocab_size, width)
        self.ngram = NgramEmbedding(config.ngram_buckets, width) if config.ngram_buckets else None
        self.position = nn.Embedding(config.block_size, width)
        # two local layers before the core and two after it, as SpaceByte has
        self.layers_in = nn.ModuleList([ByteBlock(width, n_head) for _ in range(2)])
        # a chunk's pooled byte state -> the core's input; the core's output -> the byte stream
        self.up = nn.Linear(width, config.n_embd, bias=False)
        self.down = nn.Linear(config.n_embd, width, bias=False)
        self.layers_out = nn.ModuleList([ByteBlock(width, n_head) for _ in range(2)])
        self.ln = nn.LayerNorm(width)

    def forward(self, idx, core, cache=None):
        """Final byte states (B, T, width) of bytes idx (B, T), continuing a PooledCache if given."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        # chunk ends decided from the bytes so far, never the ones after
        seen = idx if cache is None else torch.cat([x for x in (cache.bytes, idx) if x is not None], dim=1)
        ends = chunk_ends(seen, self.boundary)
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.byte_embedding(idx) + self.position(positions)
        if self.ngram is not None:
            x = x + self.ngram(seen[:, max(0, start - 3):])[:, -T:]
        mask = window_mask(T, start, self.window, idx.device)
        for i, block in enumerate(self.layers_in):
            x = block(x, mask, None if cache is None else cache.local[i])
        states = x if cache is None else torch.cat([s for s in (cache.states, x) if s is not None], dim=1)
        core_out = self.run_core(states, ends, start, core, cache)
        if cache is not None:
            cache.bytes, cache.ends, cache.states, cache.core_out = seen, ends, states, core_out
        x = x + self.to_bytes(core_out, ends, start)
        for i, block in enumerate(self.layers_out, start=len(self.layers_in)):
            x = block(x, mask, None if cache is None else cache.local[i])
        return self.ln(x)

    def run_core(self, states, ends, start, core, cache=None):
        """
        The core's output, projected down, for every chunk that has ended so far: (B, chunks,
        width), the cached chunks' followed by those ending among the new bytes (at start and
        after). Rows hold different numbers of chunks; each row's new chunks fill (B, S) slots
        in order, S the most in any row, and the spare slots after a row's last chunk run
        through the core unread (the core is causal, so they change nothing before them).
        """
        B, L, C = states.shape
        new_ends = ends[:, start:]
        counts = new_ends.sum(dim=1)
        S = int(counts.max()) if B else 0
        done = None if cache is None or cache.core_out is None else cache.core_out
        if S == 0:
            return done if done is not None else states.new_zeros(B, 0, C)
        # each chunk's mean byte state (Dynamic Token Pooling): byte t belongs to the chunk of the
        # ends before it; sums over the bytes so far, so a chunk begun in the cache is whole
        member = ends.long().cumsum(dim=1) - ends.long()
        sums = states.new_zeros(B, L + 1, C).scatter_add(1, member[..., None].expand(B, L, C), states)
        sizes = states.new_zeros(B, L + 1).scatter_add(1, member, torch.ones_like(states[..., 0]))
        first = 0 if cache is None else cache.core.length
        inputs = sums[:, first:first + S] / sizes[:, first:first + S, None].clamp(min=1)
        y = self.down(core(self.up(inputs), None if cache is None else cache.core))
        return y if done is None else torch.cat([done, y], dim=1)

    def to_bytes(self, core_out, ends, start):
        """
        What the core adds to the new bytes' states (B, T, width): chunk c's output at every byte
        from its last one up to the next chunk's last byte, so a byte sees only chunks that ended
        at it or before it, and bytes before the first chunk's end get nothing.
        """
        latest = ends.long().cumsum(dim=1)[:, start:] - 1  # the last chunk ended at or before each byte
        if core_out.size(1) == 0:
            return core_out.new_zeros(*latest.shape, core_out.size(2))
        added = core_out.gather(1, latest.clamp(min=0)[..., None].expand(-1, -1, core_out.size(2)))
        return added * (latest >= 0)[..., None]


# ----------------------------------------------------------------------------
# command line: where each boundary cuts a text, and what the byte layers cost

@dataclass
class ShowConfig:
    n_embd: int = 128  # the core's width (cpu-tiny)
    block_size: int = 256  # bytes of context
    byte_width: int = 64
    byte_window: int = 64


def show_chunks(data, last_bytes):
    """(number of chunks, the chunks as text) of data cut after each of the bytes at last_bytes."""
    cuts = [0, *(np.asarray(last_bytes) + 1).tolist()]
    chunks = [data[a:b] for a, b in zip(cuts, cuts[1:] + [len(data)]) if a < b]
    return len(chunks), " | ".join(repr(c)[2:-1] for c in chunks)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config = ShowConfig()
    words = [a for a in argv if not a.startswith("--")]
    parse_config([config], [a for a in argv if a.startswith("--")],
                 usage='python byte_tokenizer.py "some text" [--key=value ...]')
    data = (" ".join(words) if words else "Super tiny models: naïve café, 東京, 🙂!").encode("utf-8")
    print(f"{len(data)} bytes: {data!r}")
    idx = torch.tensor(list(data))[None]
    for boundary in ("space", "fixed"):
        n, shown = show_chunks(data, np.flatnonzero(chunk_ends(idx, boundary)[0].numpy()))
        print(f"{boundary:>6}: {n} chunks, {len(data) / n:.2f} bytes each (found from the past): {shown}")
    try:
        markers = np.flatnonzero(mark_gpt2_token_ends(data) == GPT2_TOKEN_END)
        n, shown = show_chunks(data, markers - np.arange(1, len(markers) + 1))  # each token's last byte
        print(f"  gpt2: {n} chunks, {len(data) / n:.2f} bytes each (looks ahead: read from bytes_gpt2 "
              f"data's markers): {shown}")
    except UserError as e:  # offline without tiktoken's files: show the others
        print(f"  gpt2: unavailable ({e})")
    layers = PooledBytes(SimpleNamespace(**vars(config), vocab_size=BYTE_VOCAB, boundary="space",
                                         ngram_buckets=POOLED_NGRAM_BUCKETS))
    pooled = sum(p.numel() for p in layers.parameters())
    tied = GPT2_VOCAB * config.n_embd
    print(f"pooled byte layers around a core of width {config.n_embd}: {pooled:,} parameters; a tied "
          f"GPT-2 embedding ({GPT2_VOCAB:,} x {config.n_embd}): {tied:,} ({pooled / tied:.1%} of it)")


if __name__ == "__main__":
    run(main)
