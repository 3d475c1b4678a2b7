"""
The transformer at the centre of every model in this project.

A decoder-only GPT in the style of nanoGPT, with the knobs that matter for
*super tiny* models:
- pre-norm blocks with LayerNorm or RMSNorm,
- causal self-attention through `scaled_dot_product_attention`, optionally
  grouped-query (fewer key/value heads than query heads: a smaller KV cache),
- learned or rotary (RoPE) positions,
- a GELU (4x) or SwiGLU feed-forward block,
- the input embedding tied to the output head (on by default: at 50k tokens
  the embedding is most of a tiny model),
- MobileLLM's block-wise weight sharing (each block applied k times in a row:
  depth without parameters) and STLM's FFN sharing (one FFN for all layers),
- generation with a KV cache, and checkpoints written atomically and loaded
  with `weights_only=True`.

The embedder and head around the core are picked by `embedder`: `tokens` (a
row per token id, BPE or plain bytes, vocab_size from the data) or `pooled`
(byte_tokenizer.py: each chunk's bytes pooled into one vector, and a byte
decoder for the next chunk). The data decides which; the core is the same.

`python model.py` prints the presets' parameter table and runs one forward pass.
"""

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import byte_tokenizer
import reparam
from cli import UserError

CHECKPOINT_FORMAT = "stlm-checkpoint"
CHECKPOINT_VERSION = 1
INIT_STD = 0.02  # GPT-2's initialisation scale for every weight matrix
NORM_EPS = 1e-5  # GPT-2's LayerNorm epsilon, used by both norms
BYTE_VOCAB = 256  # a byte-level model predicts one of 256 byte values


@dataclass
class GPTConfig:
    block_size: int = 64  # context length in tokens
    vocab_size: int = BYTE_VOCAB
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 = n_head
    n_embd: int = 128
    ffn: str = "gelu"  # gelu | swiglu | linear (one d x d matrix) | rep_linear | rep_parallel | rep_anneal (reparam.py)
    ffn_hidden: int = 0  # 0 = 4 * n_embd for gelu, about 8/3 * n_embd for swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    pos: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-2 has them)
    dropout: float = 0.0
    tie_embeddings: bool = True  # output head shares the input embedding's matrix
    block_repeat: int = 1  # MobileLLM: each block is applied this many times in a row
    share_ffn: bool = False  # STLM: every layer uses the same feed-forward block
    anneal_fraction: float = 0.5  # rep_anneal: share of hidden channels whose GELU is annealed to the identity
    anneal_iters: int = 1000  # rep_anneal: training steps until those channels are exactly linear
    ffn_merged: bool = False  # set by reparam.py: the rep_* FFN is merged into its inference form
    ffn_norm_folded: bool = False  # set by reparam.py: ln_2's scale and shift are folded into the FFN
    # embedder and head (byte_tokenizer.py); embedder and max_chunk_bytes come from the data
    embedder: str = "tokens"  # tokens | pooled: one vector per token id, or per chunk of bytes
    max_chunk_bytes: int = byte_tokenizer.MAX_CHUNK_BYTES
    byte_width: int = byte_tokenizer.BYTE_WIDTH  # width of the pooling encoder and the byte decoder
    byte_heads: int = byte_tokenizer.BYTE_HEADS
    encoder_layers: int = byte_tokenizer.ENCODER_LAYERS  # bidirectional layers over a chunk's bytes before pooling
    decoder_layers: int = byte_tokenizer.DECODER_LAYERS  # causal layers of the byte decoder
    pooling: str = "mean"  # mean | attention

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self):
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.ffn == "swiglu":
            # two input matrices instead of one: 2/3 of 4x keeps the parameter
            # count of the GELU block; rounded up to a multiple of 64 for speed
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    def validate(self):
        """Raise a UserError naming the first inconsistent setting."""
        choices = {"ffn": ("gelu", "swiglu", *reparam.FFN_TYPES), "norm": ("layernorm", "rmsnorm"),
                   "pos": ("learned", "rope"), "embedder": ("tokens", "pooled"), "pooling": byte_tokenizer.POOLINGS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"--{key}={getattr(self, key)} is not one of {', '.join(allowed)}")
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "block_repeat", "max_chunk_bytes",
                    "byte_width", "byte_heads"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key} must be at least 1, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd={self.n_embd} must be divisible by --n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise UserError(f"--n_head={self.n_head} must be divisible by --n_kv_head={self.kv_heads}")
        if self.byte_width % self.byte_heads:
            raise UserError(f"--byte_width={self.byte_width} must be divisible by --byte_heads={self.byte_heads}")
        if self.pos == "rope" and self.head_dim % 2:
            raise UserError(f"rotary positions need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        reparam.check_config(self)


# Named shapes. `cpu-tiny` is nanoGPT's documented CPU shape; the stlm-* presets
# are deep and thin (MobileLLM's finding for small models) and are named by
# their parameter count at byte level, where the embedding is negligible.
PRESETS = {
    "cpu-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "stlm-10m": dict(n_layer=12, n_head=4, n_embd=256, block_size=512, ffn="swiglu", norm="rmsnorm", pos="rope"),
    "stlm-50m": dict(n_layer=16, n_head=8, n_embd=512, block_size=512, ffn="swiglu", norm="rmsnorm", pos="rope"),
    "stlm-100m": dict(n_layer=20, n_head=10, n_embd=640, block_size=512, ffn="swiglu", norm="rmsnorm", pos="rope"),
}


def preset_config(name, **overrides):
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


def make_norm(config, affine=True):
    # affine=False: a norm whose scale and shift were folded into the next layer
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=NORM_EPS, elementwise_affine=affine)
    return nn.LayerNorm(config.n_embd, eps=NORM_EPS, elementwise_affine=affine, bias=config.bias)


def rotary_tables(config):
    """cos and sin of every (position, frequency) pair, each (block_size, head_dim / 2)."""
    inv_freq = config.rope_theta ** -(torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    # rotate each (first half, second half) pair of channels by its position's angle
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """
    Keys and values of every position seen so far, one slot per block
    application, preallocated for the whole context so decoding never copies.
    """

    def __init__(self, config, batch_size, device, dtype):
        n_slots = config.n_layer * config.block_repeat
        shape = (n_slots, batch_size, config.kv_heads, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already stored

    def store(self, slot, k, v):
        """Append this step's keys/values for one slot; return all of them so far."""
        end = self.length + k.size(2)
        self.k[slot, :, :, self.length:end] = k
        self.v[slot, :, :, self.length:end] = v
        return self.k[slot, :, :, :end], self.v[slot, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_width = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary=None, cache=None, slot=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.store(slot, k, v)
        # Causal masking: a fresh sequence uses the built-in causal kernel; one
        # new token may see the whole cache; a chunk after a cached prefix
        # needs an explicit mask offset by the prefix length.
        mask, causal = None, start == 0 and T > 1
        if start > 0 and T > 1:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU feed-forward: d -> 4d -> d, with GPT-2's tanh approximation of GELU."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020): silu(x W_gate) * (x W_up), then W_down."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.hidden_dim, bias=config.bias)  # gate and up, fused
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


def make_ffn(config):
    if config.ffn in reparam.FFN_TYPES:
        return reparam.make_ffn(config)  # the linear and reparameterizable FFNs live with their merge math
    return SwiGLU(config) if config.ffn == "swiglu" else MLP(config)


class Block(nn.Module):
    def __init__(self, config, ffn):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, affine=not config.ffn_norm_folded)
        self.mlp = ffn

    def forward(self, x, rotary=None, cache=None, slot=0):
        x = x + self.attn(self.ln_1(x), rotary, cache, slot)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        if config.embedder == "pooled":
            # a chunk's bytes in, the next chunk's bytes out: no vocabulary-sized matrix to tie
            byte_sizes = (config.byte_width, config.byte_heads)
            self.wte = byte_tokenizer.PooledEmbedder(config.n_embd, *byte_sizes, config.encoder_layers,
                                                     config.max_chunk_bytes, config.pooling)
            self.lm_head = byte_tokenizer.ByteDecoder(config.n_embd, *byte_sizes, config.decoder_layers,
                                                      config.max_chunk_bytes)
        else:
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.wte.weight
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        shared_ffn = make_ffn(config) if config.share_ffn else None
        self.h = nn.ModuleList([Block(config, shared_ffn or make_ffn(config)) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config)
        if config.pos == "rope":
            cos, sin = rotary_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: shrink the residual-stream projections by the number of
        # residual additions, so the stream's variance does not grow with depth
        n_residual_adds = 2 * config.n_layer * config.block_repeat
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(n_residual_adds))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Parameter counts split into embedding + head and the transformer core (shared ones counted once)."""
        outer = [m for m in (self.wte, self.lm_head, self.wpe) if m is not None]
        embedding_params = {id(p) for m in outer for p in m.parameters()}
        embedding = sum(p.numel() for p in self.parameters() if id(p) in embedding_params)
        total = sum(p.numel() for p in self.parameters())
        return {"embedding": embedding, "core": total - embedding, "total": total}

    def set_step(self, steps_done):
        """Tell modules that follow the training schedule (reparam's annealed FFN) how many steps are done."""
        for module in self.modules():
            if isinstance(module, reparam.RepAnnealFFN):
                module.steps_done.fill_(steps_done)

    def hidden_states(self, idx, cache=None):
        """
        Final-norm outputs (B, T, n_embd) for token ids idx (B, T), or chunks
        (B, T, L) for a pooled model, continuing `cache` if given.
        """
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        rotary = None
        if self.config.pos == "rope":
            rotary = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.drop(x)
        slot = 0
        for block in self.h:
            for _ in range(self.config.block_repeat):
                x = block(x, rotary, cache, slot)
                slot += 1
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def forward(self, idx, targets=None, reduction="mean"):
        """
        Logits (B, T, vocab) and, when targets are given, the cross-entropy in
        nats: the mean per token, or the sum with reduction="sum". A pooled
        model needs the target chunks (B, T, L): its byte decoder reads them
        (teacher forcing) and returns logits (P, 257), one row per predicted
        byte or end of chunk (see byte_tokenizer.ByteDecoder); its mean is per
        byte of text.
        """
        h = self.hidden_states(idx)
        if self.config.embedder == "pooled":
            if targets is None:
                raise ValueError("a pooled model predicts a chunk's bytes given the chunk: pass targets")
            logits = self.lm_head(h, targets)
            return logits, byte_tokenizer.chunk_loss(logits, targets, reduction)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
        return logits, loss

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None):
        """
        Yield (B, 1) sampled tokens one at a time, continuing the prompt idx (B, T).
        A pooled model yields chunks (B, 1, max_chunk_bytes), each sampled byte
        by byte, continuing prompt chunks (B, T, max_chunk_bytes).

        The model sees at most block_size tokens. With the cache, once the
        context is full it is rebuilt from the newest half of it (one prefill
        every block_size / 2 tokens) rather than recomputed every token. Without
        the cache the same windows are recomputed in full: the reference the
        tests compare the cache against.
        """
        block_size = self.config.block_size
        keep = block_size - block_size // 2  # tokens kept when the window is full
        window = idx[:, -block_size:]  # the tokens the model conditions on
        cache = KVCache(self.config, idx.size(0), idx.device, self.ln_f.weight.dtype) if use_cache else None
        unseen = window  # tokens the cache has not yet seen
        for _ in range(max_new_tokens):
            tokens = window if cache is None else unseen
            h = self.hidden_states(tokens, cache)[:, -1]
            pick = lambda logits: sample_next(logits, temperature, top_k, top_p, generator)  # noqa: E731
            # a pooled model's head picks the next chunk byte by byte
            next_token = self.lm_head.sample(h, pick) if self.config.embedder == "pooled" else pick(self.lm_head(h))
            yield next_token
            window = torch.cat([window, next_token], dim=1)
            unseen = next_token
            if window.size(1) > block_size:
                window = window[:, -keep:]
                if cache is not None:
                    cache.length, unseen = 0, window

    def generate(self, idx, max_new_tokens, **sampling):
        """The prompt followed by max_new_tokens sampled tokens, as one (B, T + new) tensor."""
        new = list(self.generate_stream(idx, max_new_tokens, **sampling))
        return torch.cat([idx, *new], dim=1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, vocab). temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus sampling: keep the most likely tokens whose mass reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        beyond_nucleus = mass_before >= top_p
        beyond_nucleus[:, 0] = False  # the likeliest token always stays, even at top_p=0
        sorted_logits = sorted_logits.masked_fill(beyond_nucleus, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


# ----------------------------------------------------------------------------
# tokens <-> bytes for the tokenizations data/prepare.py writes

GPT2_ENCODING = "gpt2"


def _gpt2_encoding():
    import tiktoken  # only BPE models need it
    return tiktoken.get_encoding(GPT2_ENCODING)


def encode_text(tokenization, text, meta=None):
    """
    Token ids of a string (a prompt), as data/prepare.py would tokenize it; for
    pooled data (meta names its segmenter) rows of chunk bytes padded to max_chunk_bytes.
    """
    if tokenization == "pooled":
        segmenter = byte_tokenizer.Segmenter.from_meta(meta)
        return byte_tokenizer.pad_chunks(segmenter.split(text), segmenter.max_chunk_bytes).tolist()
    if tokenization == "bytes":
        return list(text.encode("utf-8"))
    if tokenization == "bpe":
        return _gpt2_encoding().encode_ordinary(text)
    if tokenization.startswith(HF_PREFIX):
        return load_hf_tokenizer(tokenization[len(HF_PREFIX):]).encode(text, add_special_tokens=False)
    raise UserError(f"unknown tokenization {tokenization!r}: expected bytes, bpe or hf:<tokenizer folder>")


def token_byte_table(tokenization):
    """
    The byte string of every token id: how generated ids become text, and how
    many bytes of text each predicted token covers (the denominator of bits
    per byte).
    """
    if tokenization == "bytes":
        return [bytes([i]) for i in range(BYTE_VOCAB)]
    if tokenization == "bpe":
        encoding = _gpt2_encoding()
        return [encoding.decode_single_token_bytes(i) for i in range(encoding.n_vocab)]
    if tokenization.startswith(HF_PREFIX):
        return _hf_token_bytes(load_hf_tokenizer(tokenization[len(HF_PREFIX):]))
    raise UserError(f"unknown tokenization {tokenization!r}: expected bytes, bpe or hf:<tokenizer folder>")


# A Hugging Face tokenizer from a local folder (a teacher's, for distill.py):
# data/prepare.py records it as "hf:<folder>", the name these functions take.
HF_PREFIX = "hf:"


def load_hf_tokenizer(folder):
    """A Hugging Face tokenizer from a local folder, or from a .gguf file (data/prepare.py uses this too)."""
    try:
        from transformers import AutoTokenizer  # only hf tokenizations need it
    except ImportError:
        raise UserError("a Hugging Face tokenizer needs transformers: pip install transformers") from None
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"tokenizer folder {folder} not found")
    if folder.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(folder.parent, gguf_file=folder.name)
    return AutoTokenizer.from_pretrained(folder)


def _hf_token_bytes(tokenizer):
    """
    The bytes of every id in len(tokenizer). Byte-level BPE (GPT-2, SmolLM2)
    writes each byte as one printable character: map them back. Other
    tokenizers decode token by token. A special token found in the corpus
    (a literal "<|endoftext|>") stands for its own text.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte <-> character map
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    table = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if piece is None:
            table.append(b"")
        elif all(c in char_to_byte for c in piece):
            table.append(bytes(char_to_byte[c] for c in piece))
        else:
            table.append(tokenizer.decode([i]).encode("utf-8"))
    return table


def unit_to_bytes(tokenization):
    """A function from one generated unit (a (1, 1) token id, or a pooled model's chunk) to its bytes."""
    if tokenization == "pooled":
        return byte_tokenizer.chunk_bytes
    table = token_byte_table(tokenization)
    return lambda unit: table[unit.item()]


# ----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(checkpoint, path):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**checkpoint, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict at path, refusing missing, truncated and foreign files with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one first (python train.py) or pass --ckpt=PATH")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a torch file: {e.__class__.__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project (no '{CHECKPOINT_FORMAT}' marker)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint version {checkpoint.get('version')}, this code reads {CHECKPOINT_VERSION}")
    if "model" not in checkpoint or "model_config" not in checkpoint:
        raise UserError(f"{path} holds no model (no 'model' and 'model_config' entries)")
    return checkpoint


def model_from_checkpoint(checkpoint):
    """The GPT stored in a checkpoint dict, in eval mode."""
    config = GPTConfig(**checkpoint["model_config"])
    model = GPT(config)
    model.load_state_dict(checkpoint["model"])
    return model.eval()


# ----------------------------------------------------------------------------

def main():
    print(f"{'preset':<10} {'layers':>6} {'width':>6} {'context':>7} {'embedding':>10} {'core':>11} {'total':>11}")
    for name in PRESETS:
        counts = GPT(preset_config(name)).num_params()
        c = preset_config(name)
        print(f"{name:<10} {c.n_layer:>6} {c.n_embd:>6} {c.block_size:>7} "
              f"{counts['embedding']:>10,} {counts['core']:>11,} {counts['total']:>11,}")
    print(f"(byte-level vocabulary of {BYTE_VOCAB}; a 50,257-token GPT-2 vocabulary adds 50,001 x width)")
    torch.manual_seed(0)
    model = GPT(preset_config("cpu-tiny")).eval()
    idx = torch.randint(0, BYTE_VOCAB, (1, model.config.block_size))
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits, _ = model(idx)
    ms = 1000 * (time.perf_counter() - t0)
    print(f"cpu-tiny forward: input {tuple(idx.shape)} -> logits {tuple(logits.shape)} in {ms:.1f} ms")


if __name__ == "__main__":
    main()
