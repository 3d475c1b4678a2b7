"""
The transformer at the centre of every model in this project, how it
generates text, and how it is saved and loaded.

A decoder-only GPT in the style of nanoGPT, with the knobs that matter for
*super tiny* models: LayerNorm or RMSNorm, learned or rotary positions,
grouped-query attention, QK-norm, several feed-forward blocks (GELU, ReLU
squared, SwiGLU, and the linear and reparameterizable ones that reparam.py
merges), the input embedding tied to the output head, and MobileLLM's and
STLM's weight sharing. The embedder around the core is a token table, or
(embedder=pooled, on bytes data) byte_tokenizer.py's pooled byte layers.

    python model.py          # the presets' parameter table and one forward pass
"""

import contextlib
import errno
import math
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import byte_tokenizer
from cli import UserError, parse_config, run
from tokenizer import BYTE_VOCAB, GPT2_VOCAB

INIT_STD = 0.02  # GPT-2's initialisation scale for every weight matrix
NORM_EPS = 1e-5  # GPT-2's LayerNorm epsilon, used by both norms and QK-norm
ROPE_THETA = 10000.0  # rotary positions' base wavelength (RoFormer, Llama)


@dataclass
class GPTConfig:
    block_size: int = 64  # context length in tokens
    vocab_size: int = BYTE_VOCAB  # set by the data (meta.json)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 = n_head
    n_embd: int = 128
    # the feed-forward block, one of FFNS: gelu | relu2 | swiglu | linear | gelu_linear, or a training
    # form that reparam.py merges into linear or gelu_linear: rep_linear | rep_parallel | rep_anneal
    ffn: str = "gelu"
    ffn_hidden: int = 0  # 0 = 4 * n_embd, or about 8/3 * n_embd for swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    pos: str = "learned"  # learned | rope
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-2 has them)
    dropout: float = 0.0
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    tie_embeddings: bool = True  # the output head shares the input embedding's matrix
    block_repeat: int = 1  # MobileLLM: each block is applied this many times in a row
    share_ffn: bool = False  # STLM: every layer uses the same feed-forward block
    anneal_iters: int = 1000  # rep_anneal: training steps until its annealed channels are exactly linear
    # the embedder and head: a token table, or (on bytes data) byte_tokenizer.py's pooled byte layers
    embedder: str = "tokens"  # tokens | pooled
    boundary: str = "space"  # pooled: where chunks end: space | fixed | gpt2 (bytes_gpt2 data's markers)
    byte_width: int = 64  # pooled: width of the local byte layers
    byte_window: int = 64  # pooled: bytes each local layer attends to
    ngram_buckets: int = -1  # byte data: hashed 2-4-gram tables of this many rows; 0 = none, -1 = 4093 if pooled

    def __post_init__(self):
        # pooled models train best with hashed n-grams; a plain byte model without them stays exportable
        if self.ngram_buckets == -1:
            self.ngram_buckets = byte_tokenizer.POOLED_NGRAM_BUCKETS if self.embedder == "pooled" else 0

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
        choices = {"ffn": tuple(FFNS), "norm": ("layernorm", "rmsnorm"), "pos": ("learned", "rope"),
                   "embedder": ("tokens", "pooled"), "boundary": byte_tokenizer.BOUNDARIES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"--{key}={getattr(self, key)} is not one of {', '.join(allowed)}")
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "block_repeat",
                    "byte_width", "byte_window", "anneal_iters"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key} must be at least 1, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd={self.n_embd} must be divisible by --n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise UserError(f"--n_head={self.n_head} must be divisible by --n_kv_head={self.kv_heads}")
        if self.pos == "rope" and self.head_dim % 2:
            raise UserError(f"rotary positions need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.embedder == "pooled":
            byte_tokenizer.check_config(self)
        if self.ngram_buckets < 0 or (self.ngram_buckets and self.vocab_size > 257):
            raise UserError(f"--ngram_buckets={self.ngram_buckets} hashes byte n-grams: 0 (off) or more, "
                            f"on bytes or bytes_gpt2 data (this data has {self.vocab_size} token ids)")


# Named shapes. `cpu-tiny` is nanoGPT's documented CPU shape with the ingredients
# measured to train best at that scale (ReLU squared, QK-norm, rotary positions,
# RMSNorm; --ffn=gelu --qk_norm=false --pos=learned --norm=layernorm is nanoGPT's
# own model); the stlm-* presets share one recipe, are deep and thin (MobileLLM's
# finding for small models) and are named by their parameter count at byte level.
STLM_RECIPE = dict(block_size=512, ffn="swiglu", norm="rmsnorm", pos="rope")
PRESETS = {
    "cpu-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, ffn="relu2", qk_norm=True,
                     norm="rmsnorm", pos="rope"),
    "stlm-10m": dict(STLM_RECIPE, n_layer=12, n_head=4, n_embd=256),
    "stlm-50m": dict(STLM_RECIPE, n_layer=16, n_head=8, n_embd=512),
    "stlm-100m": dict(STLM_RECIPE, n_layer=20, n_head=10, n_embd=640),
}


def preset_config(name, **overrides):
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------
# attention: norms, rotary positions, causal self-attention

def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(config.n_embd, eps=NORM_EPS, bias=config.bias)


def make_dropout(config):
    # none at all when off: a Dropout module costs microseconds per call even at p = 0 (decode's budget)
    return nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()


def rotary_tables(config):
    """cos and sin of every (position, frequency) pair, each (block_size, head_dim / 2)."""
    # angles in float64: position x frequency loses digits in float32 at long contexts
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim
    inv_freq = ROPE_THETA ** -exponents
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """
    x (..., T, head_dim) with each pair (channel i of the first half, channel i of the second half)
    turned by the angle of column i at its position: cos and sin (T, head_dim / 2) broadcast over the
    leading dimensions. The "rotate half" layout of Hugging Face's Llama.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_width = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, rotary=None, cache=None, slot=0):
        """
        x (B, T, n_embd) -> (B, T, n_embd): each position attends to itself and the positions before
        it. rotary: the (cos, sin) rows of these positions, or None; cache: a KVCache holding the
        keys and values of cache.length earlier positions (stored in `slot`, one per block application),
        which this call's T positions follow. With qk_norm, each head's queries and keys are
        RMS-normalised before the rotation; with n_kv_head < n_head, query heads share key/value heads.
        """
        B, T, C = x.size()
        # every head of q, k and v side by side, (B, heads, T, head_dim): q's, then k's, then v's
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        # queries and keys get the same per-head treatment, so each step below is one call for both
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        if self.qk_norm:
            # QK-norm (Dehghani et al. 2023; modded-nanogpt, nanochat): unit-RMS queries and keys
            # bound the attention logits, so a high learning rate cannot blow up the softmax
            qk = F.rms_norm(qk, (self.head_dim,), eps=NORM_EPS)
        if rotary is not None:
            qk = apply_rotary(qk, *rotary)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        start = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.store(slot, k, v)
        # Causal masking: a fresh sequence uses the built-in causal kernel; one
        # new token may see the whole cache; a chunk after a cached prefix
        # needs an explicit mask offset by the prefix length.
        mask, causal = None, start == 0 and T > 1
        if start > 0 and T > 1:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


# ----------------------------------------------------------------------------
# feed-forward blocks: the usual ones, and the linear forms that reparam.py merges

def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")  # GPT-2's approximation, so GPT-2 weights load exactly


def relu_squared(x):
    # ReLU squared (So et al. 2021, "Primer"; modded-nanogpt, nanochat): trains better than GELU in
    # small GPTs, and on a CPU it is two cheap elementwise ops where tanh-GELU is an expensive one
    return F.relu(x).square()


class FFN(nn.Module):
    """
    d -> hidden -> d through GPT-2's tanh approximation of GELU, ReLU squared (ffn=relu2),
    or nothing at all (rep_linear: two matrices that reparam.py multiplies into one).
    """

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        activations = {"gelu": gelu_tanh, "relu2": relu_squared, "rep_linear": lambda x: x}
        self.activation = activations[config.ffn]

    def forward(self, x):
        return self.c_proj(self.activation(self.c_fc(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020): silu(x W_gate) * (x W_up), then W_down."""

    def __init__(self, config):
        super().__init__()
        # the gate's and the up projection's matrices, fused into one
        self.c_fc = nn.Linear(config.n_embd, 2 * config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class LinearFFN(nn.Module):
    """One d x d matrix: trained directly (ffn=linear, the control), or rep_linear and rep_parallel merged."""

    def __init__(self, config):
        super().__init__()
        # named c_proj: it writes to the residual stream, so GPT gives it the depth-scaled init
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(x)


class GeluLinearFFN(nn.Module):
    """
    A GELU FFN beside a d x d linear path (ffn=gelu_linear, or a merged rep_anneal). One matrix
    computes the GELU's inputs and the linear path's output together: one matmul, not two.
    """

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim + config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)

    def forward(self, x):
        h, linear = self.c_fc(x).split([self.c_proj.in_features, self.c_proj.out_features], dim=-1)
        return self.c_proj(gelu_tanh(h)) + linear


class RepParallelFFN(nn.Module):
    """
    RepVGG's parallel branches on the same input, each times a learnable scalar:
    dense + low-rank + diagonal + identity, a sum of linear maps (reparam.py adds them up).
    No batch norm: its batch statistics would mix positions and leak future tokens into the past.
    """

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        rank = max(1, d // 4)
        self.c_proj = nn.Linear(d, d, bias=config.bias)  # the dense branch
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, d, bias=False)
        self.diagonal = nn.Parameter(torch.ones(d))
        # dense and low-rank start on; the diagonal and identity branches start at zero
        # so the block begins as an ordinary small-init FFN, and grow if they help
        self.scales = nn.Parameter(torch.tensor([1.0, 1.0, 0.0, 0.0]))

    def forward(self, x):
        dense, low_rank, diagonal, identity = self.scales
        per_channel = diagonal * self.diagonal + identity
        return dense * self.c_proj(x) + low_rank * self.up(self.down(x)) + per_channel * x


class RepAnnealFFN(nn.Module):
    """
    A GELU FFN whose last half of hidden channels compute (1 - t) * gelu(h) + t * h, t going
    from 0 to 1 over anneal_iters optimizer steps (a buffer that train.py sets through
    GPT.set_step). At t = 1 those channels are linear and merge into a d x d path beside a
    narrower GELU: a gelu_linear FFN.
    """

    def __init__(self, config):
        super().__init__()
        self.n_linear = config.hidden_dim // 2
        self.n_gelu = config.hidden_dim - self.n_linear
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.anneal_iters = config.anneal_iters
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def progress(self):
        """t in [0, 1] as a tensor, so a GPU never waits for the host."""
        # integers divided in float64: t is exactly 1 at the end
        return (self.steps_done.to(torch.float64) / self.anneal_iters).clamp(max=1.0)

    def forward(self, x):
        nonlinear, annealed = self.c_fc(x).split([self.n_gelu, self.n_linear], dim=-1)
        annealed = torch.lerp(gelu_tanh(annealed), annealed, self.progress().to(x.dtype))
        return self.c_proj(torch.cat([gelu_tanh(nonlinear), annealed], dim=-1))


# every ffn setting and its module
FFNS = {"gelu": FFN, "relu2": FFN, "swiglu": SwiGLU, "linear": LinearFFN, "gelu_linear": GeluLinearFFN,
        "rep_linear": FFN, "rep_parallel": RepParallelFFN, "rep_anneal": RepAnnealFFN}


def make_ffn(config):
    return FFNS[config.ffn](config)


# ----------------------------------------------------------------------------
# the model

class Block(nn.Module):
    def __init__(self, config, ffn):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.ffn = ffn
        self.dropout = make_dropout(config)  # on what each branch adds to the residual stream

    def forward(self, x, rotary=None, cache=None, slot=0):
        x = x + self.dropout(self.attn(self.ln_1(x), rotary, cache, slot))
        return x + self.dropout(self.ffn(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        if config.embedder == "pooled":
            # bytes in, next-byte logits out, the core in between at chunk ends: a 256-row table, not 50k
            self.pooled = byte_tokenizer.PooledBytes(config)
            embedding, width = self.pooled.byte_embedding, config.byte_width
        else:
            self.wte = embedding = nn.Embedding(config.vocab_size, config.n_embd)
            width = config.n_embd
            if config.ngram_buckets:
                self.ngram = byte_tokenizer.NgramEmbedding(config.ngram_buckets, config.n_embd)
        self.lm_head = nn.Linear(width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = embedding.weight
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = make_dropout(config)
        shared_ffn = make_ffn(config) if config.share_ffn else None
        self.h = nn.ModuleList(Block(config, shared_ffn or make_ffn(config)) for _ in range(config.n_layer))
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
        self.annealed = [m for m in self.modules() if isinstance(m, RepAnnealFFN)]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Parameter counts: embedding + head, and the transformer core (shared ones counted once)."""
        outer = [getattr(self, name, None) for name in ("wte", "ngram", "pooled")] + [self.lm_head, self.wpe]
        embedding_params = {id(p) for m in outer if m is not None for p in m.parameters()}
        embedding = sum(p.numel() for p in self.parameters() if id(p) in embedding_params)
        total = sum(p.numel() for p in self.parameters())
        return {"embedding": embedding, "core": total - embedding, "total": total}

    def set_step(self, steps_done):
        """Tell rep_anneal FFNs, whose schedule follows training, how many optimizer steps are done."""
        for module in self.annealed:
            module.steps_done.fill_(steps_done)

    def hidden_states(self, idx, cache=None):
        """
        Final-norm outputs (B, T, n_embd) of token ids idx (B, T), continuing `cache` if given; a
        pooled model's are its final byte states (B, T, byte_width), the core run at chunk ends.
        """
        if self.config.embedder == "pooled":
            return self.pooled(idx, self.core, cache)
        return self.core(self.embed(idx, cache), cache)

    def embed(self, idx, cache=None):
        """A token model's input vectors (B, T, n_embd): each token's row, and its n-grams' if any."""
        x = self.wte(idx)
        if self.config.ngram_buckets:
            # the n-grams ending at the new tokens reach back 3 tokens, into the cache's
            start = 0 if cache is None else cache.length
            seen = idx if cache is None else torch.cat([cache.tokens[:, :start], idx], dim=1)
            x = x + self.ngram(seen[:, max(0, start - 3):])[:, -idx.size(1):]
            if cache is not None:
                cache.tokens = seen
        return x

    def core(self, x, cache=None):
        """The transformer core over input vectors x (B, T, n_embd): positions, blocks, final norm."""
        T = x.size(1)
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=x.device))
        rope = self.config.pos == "rope"
        rotary = (self.rope_cos[start:start + T], self.rope_sin[start:start + T]) if rope else None
        x = self.drop(x)
        # block_repeat applies each block several times in a row: each application has its own cache slot
        slot = 0
        for block in self.h:
            for _ in range(self.config.block_repeat):
                x = block(x, rotary, cache, slot)
                slot += 1
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def head(self, h):
        """Token logits from final hidden states."""
        return self.lm_head(h)

    def forward(self, idx, targets=None, reduction="mean"):
        """
        Logits (B, T, vocab) and, given targets, the cross-entropy in nats: the mean per token, or
        the sum with reduction="sum" (a pooled model's tokens are bytes: nats per byte).
        """
        logits = self.head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                                   reduction=reduction)
        return logits, loss

    # generation, with the KV cache and the sampler defined after this class

    def new_cache(self, batch_size, device, dtype):
        """An empty KV cache: the core's, or a pooled model's (its byte layers' and its core's)."""
        cache = KVCache(self.config, batch_size, device, dtype)
        if self.config.embedder == "pooled":
            n_local_layers = len(self.pooled.layers_in) + len(self.pooled.layers_out)
            return byte_tokenizer.PooledCache(cache, n_local_layers)
        return cache

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, use_cache=True, temperature=1.0, top_k=None,
                        top_p=None, generator=None):
        """
        Yield sampled tokens one at a time, (B, 1) each, continuing the prompt idx
        (B, T); a pooled model's tokens are bytes. The model sees at most
        block_size tokens, and the two modes window them differently, so their
        samples part ways once the context is full.
        """
        block_size = self.config.block_size
        if not use_cache:
            # nanoGPT's sliding window: every new token recomputes the whole forward pass over the
            # last block_size tokens
            for _ in range(max_new_tokens):
                idx = idx[:, -block_size:]
                logits = self.head(self.hidden_states(idx)[:, -1])
                token = sample_next(logits, temperature, top_k, top_p, generator)
                yield token
                idx = torch.cat([idx, token], dim=1)
            return
        # The cache costs one position's work per token. It cannot slide (learned positions would
        # shift, and each layer's keys depend on every earlier token of the window), so when the
        # window is full the cache is refilled from its newest half: the model sees between
        # block_size / 2 and block_size tokens.
        window = idx[:, -block_size:]  # the tokens the model conditions on
        cache = self.new_cache(idx.size(0), idx.device, self.ln_f.weight.dtype)
        unseen = window  # the tokens the cache has not seen yet
        step = self.one_token_step()
        for _ in range(max_new_tokens):
            if unseen.size(1) == 1:
                logits = step(unseen, cache)
            else:
                logits = self.head(self.hidden_states(unseen, cache)[:, -1])
            token = sample_next(logits, temperature, top_k, top_p, generator)
            yield token
            window, unseen = torch.cat([window, token], dim=1), token
            if window.size(1) > block_size:
                window = unseen = window[:, -(block_size - block_size // 2):]
                cache.length = 0

    def one_token_step(self):
        """
        What generation runs for each new token, (token (B, 1), cache) -> next-token logits (B, vocab):
        a Decoder for a token model in eval mode, the modules for the rest (a pooled model's byte
        layers, or dropout in training mode).
        """
        if self.config.embedder == "tokens" and not self.training:
            return Decoder(self)
        return lambda token, cache: self.head(self.hidden_states(token, cache)[:, -1])

    def generate(self, idx, max_new_tokens, **options):
        """The prompt followed by max_new_tokens sampled tokens, as one (B, T + new) tensor."""
        return torch.cat([idx, *self.generate_stream(idx, max_new_tokens, **options)], dim=1)


# ----------------------------------------------------------------------------
# generation: a one-token step without module calls, the KV cache and sampling

class Decoder:
    """
    A token model's cached one-token step, token (B, 1) -> next-token logits (B, vocab): what
    model.head(model.hidden_states(token, cache)[:, -1]) computes, in inference (no dropout). At
    batch 1 a step is over a hundred small operations, and a module call or a lookup of a
    module's weight costs about as much as one of them; so this step works on (B, C) rows with
    every weight looked up once, when the Decoder is made. Tests hold it to the modules.
    """

    def __init__(self, model):
        config = self.config = model.config
        self.embedding, self.head = model.wte.weight, model.lm_head.weight
        # hashed n-grams read the cache's earlier tokens: the model's own embedding does that
        self.embed = model.embed if config.ngram_buckets else None
        self.positions = model.wpe.weight if model.wpe is not None else None
        self.rotary = (model.rope_cos, model.rope_sin) if config.pos == "rope" else None
        self.blocks = [(norm_function(b.ln_1), b.attn.c_attn.weight, b.attn.c_attn.bias,
                        b.attn.c_proj.weight, b.attn.c_proj.bias, norm_function(b.ln_2), ffn_function(b.ffn))
                       for b in model.h]
        self.final_norm = norm_function(model.ln_f)

    def __call__(self, token, cache):
        position = cache.length
        if position >= self.config.block_size:
            raise ValueError(f"sequence of {position + 1} tokens exceeds block_size {self.config.block_size}")
        x = F.embedding(token[:, 0], self.embedding) if self.embed is None else self.embed(token, cache)[:, 0]
        if self.positions is not None:
            x = x + self.positions[position]
        rotary = None if self.rotary is None else (self.rotary[0][position], self.rotary[1][position])
        slot = 0
        for weights in self.blocks:
            for _ in range(self.config.block_repeat):
                x = self.block(x, weights, rotary, cache, slot)
                slot += 1
        cache.length += 1
        return F.linear(self.final_norm(x), self.head)

    def block(self, x, weights, rotary, cache, slot):
        """Block.forward and CausalSelfAttention.forward for one position: x (B, C), heads (B, heads, 1, D)."""
        ln_1, qkv_weight, qkv_bias, proj_weight, proj_bias, ln_2, ffn = weights
        config, B = self.config, x.size(0)
        qkv = F.linear(ln_1(x), qkv_weight, qkv_bias).view(B, -1, 1, config.head_dim)
        qk, v = qkv.split([config.n_head + config.kv_heads, config.kv_heads], dim=1)
        if config.qk_norm:
            qk = F.rms_norm(qk, (config.head_dim,), eps=NORM_EPS)
        if rotary is not None:
            qk = apply_rotary(qk, *rotary)
        q, k = qk.split([config.n_head, config.kv_heads], dim=1)
        # the new position attends to every stored one: no mask
        k, v = cache.store(slot, k, v)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=config.kv_heads != config.n_head)
        x = x + F.linear(y.view(B, -1), proj_weight, proj_bias)
        return x + ffn(ln_2(x))


def norm_function(module):
    """A make_norm module's computation as a function of x alone, its weights bound."""
    if isinstance(module, nn.RMSNorm):
        return partial(F.rms_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                       eps=module.eps)
    return partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                   bias=module.bias, eps=module.eps)


def ffn_function(module):
    """An FFN module's computation as a function of x: FFN's (GELU, ReLU squared) written out, others' the module."""
    if type(module) is not FFN:
        return module
    up, down, activation = module.c_fc, module.c_proj, module.activation
    return lambda x: F.linear(activation(F.linear(x, up.weight, up.bias)), down.weight, down.bias)


class KVCache:
    """Keys and values of every position so far, one slot per block application, preallocated."""

    def __init__(self, config, batch_size, device, dtype):
        """Zeros for the keys and values of every slot, batch row, key/value head and position; length 0."""
        n_slots = config.n_layer * config.block_repeat
        shape = (n_slots, batch_size, config.kv_heads, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already stored
        self.tokens = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # for n-gram embeddings

    def store(self, slot, k, v):
        """Append this step's keys/values for one slot; return all of them so far."""
        end = self.length + k.size(2)
        self.k[slot, :, :, self.length:end] = k
        self.v[slot, :, :, self.length:end] = v
        return self.k[slot, :, :, :end], self.v[slot, :, :, :end]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, vocab). temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k).values[:, -1:]
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
    # torch.multinomial's own method for one draw, without its checks of the probabilities (one of which
    # waits for a GPU): of probabilities p_i / E_i with E_i exponential, the largest is token i with
    # probability p_i (the exponential race, as in Gumbel-max), and draws the same tokens from the generator
    probs = logits.softmax(dim=-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------
# checkpoints: a dict written atomically, loaded without running code

CHECKPOINT_FORMAT = "stlm-checkpoint"
CHECKPOINT_VERSION = 2  # 2: the reading edition's config keys; older checkpoints are refused


def save_checkpoint(checkpoint, path):
    """Write atomically: a crash mid-write leaves the previous file whole, a full disk no temp file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # opened here first: an unwritable folder fails with an errno, which torch's own open lacks
        tmp.open("wb").close()
        torch.save({**checkpoint, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):  # a file where the folder should be: no temp file to remove
            tmp.unlink(missing_ok=True)
        raise _write_error(e, path) from None


def _write_error(e, path):
    """The one-line error for a checkpoint that could not be written (any other error as it is)."""
    kept = "previous checkpoint kept" if path.is_file() else "no checkpoint written"
    # torch's zip writer reports a failed write, as on a full disk, with no errno
    torch_write_failures = ("inline_container", "file write failed", "iostream error", "No space left")
    if getattr(e, "errno", None) == errno.ENOSPC or any(m in str(e) for m in torch_write_failures):
        return UserError(f"disk full writing {path}, {kept}: free some space (or pick another folder) "
                         "and run again")
    if isinstance(e, OSError):  # no permission, a read-only disk, a file where a folder should be ...
        return UserError(f"could not write {path} ({e.strerror or e}), {kept}: pick another folder")
    return e  # not a failed write: a bug, to be seen in full


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict at path, refusing missing, damaged and foreign files with a one-line error."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a checkpoint file" if path.is_dir() else "no such file"
        raise UserError(f"no checkpoint at {path} ({what}): train one first (python train.py), "
                        "or name an existing checkpoint file")
    try:
        with open(path, "rb") as f:
            is_zip = zipfile.is_zipfile(f)
    except OSError as e:
        raise UserError(f"could not read {path} ({e.strerror or e})") from None
    # torch.save writes a zip archive: anything else never was a checkpoint, or has lost its end
    if not is_zip:
        raise UserError(f"{path} is not a torch checkpoint file (truncated, or another kind of file)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        # weights_only unpickles only tensors and plain containers: any other object could run code
        if "Weights only load failed" in str(e):
            raise UserError(f"{path} was refused: it holds pickled Python objects (code could run "
                            "on loading), which a checkpoint of this project never has; load only files "
                            "you trust") from None
        first_line = str(e).strip().partition("\n")[0][:120]
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project "
                        f"(no '{CHECKPOINT_FORMAT}' marker)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint version {checkpoint.get('version')}, this code reads "
                        f"{CHECKPOINT_VERSION}: train it again with this code (python train.py)")
    if "model" not in checkpoint or "model_config" not in checkpoint:
        raise UserError(f"{path} holds no model (no 'model' and 'model_config' entries)")
    return checkpoint


def model_from_checkpoint(checkpoint):
    """The GPT stored in a checkpoint dict, in eval mode."""
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()


# ----------------------------------------------------------------------------

def main(argv=None):
    parse_config([], sys.argv[1:] if argv is None else argv, usage=__doc__)  # no settings: only --help
    print(f"{'preset':<10} {'layers':>6} {'width':>6} {'context':>7} {'embedding':>10} {'core':>11} "
          f"{'total':>11}")
    for name in PRESETS:
        config = preset_config(name)
        counts = GPT(config).num_params()
        print(f"{name:<10} {config.n_layer:>6} {config.n_embd:>6} {config.block_size:>7} "
              f"{counts['embedding']:>10,} {counts['core']:>11,} {counts['total']:>11,}")
    print(f"(byte-level vocabulary of {BYTE_VOCAB}; a {GPT2_VOCAB:,}-token GPT-2 vocabulary adds "
          f"{GPT2_VOCAB - BYTE_VOCAB:,} x width)")
    torch.manual_seed(0)
    model = GPT(preset_config("cpu-tiny")).eval()
    idx = torch.randint(0, BYTE_VOCAB, (1, model.config.block_size))
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits, _ = model(idx)
    ms = 1000 * (time.perf_counter() - t0)
    print(f"cpu-tiny forward: input {tuple(idx.shape)} -> logits {tuple(logits.shape)} in {ms:.1f} ms")


if __name__ == "__main__":
    run(main)
