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
- what generation.py needs: keys and values written into a KV cache, and a
  fixed-shape one-token step for torch.compile,
- checkpoints written atomically and loaded with `weights_only=True`
  (checkpointing.py; scripts import them from here).

The embedder and head around the core are picked by `embedder`: `tokens` (a
row per token id, BPE or plain bytes, vocab_size from the data) or `pooled`
(byte_tokenizer.py, on bytes data: narrow byte layers over every byte, the
core only at chunk ends, its outputs added back into the byte stream, and
a next-byte head). The core is the same.

`python model.py` prints the presets' parameter table and runs one forward pass.
"""

import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import byte_tokenizer
import generation
import reparam
from checkpointing import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, save_checkpoint  # noqa: F401
from cli import UserError, parse_config, run
from tokenizer import BYTE_VOCAB, FIXED_CHUNK_BYTES, MAX_CHUNK_BYTES

INIT_STD = 0.02  # GPT-2's initialisation scale for every weight matrix
NORM_EPS = 1e-5  # GPT-2's LayerNorm epsilon, used by both norms


@dataclass
class GPTConfig:
    block_size: int = 64  # context length in tokens
    vocab_size: int = BYTE_VOCAB
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 = n_head
    n_embd: int = 128
    ffn: str = "gelu"  # gelu | relu2 | swiglu | linear (one d x d matrix) | rep_linear | rep_parallel | rep_anneal (reparam.py)
    ffn_hidden: int = 0  # 0 = 4 * n_embd for gelu, about 8/3 * n_embd for swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    pos: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-2 has them)
    dropout: float = 0.0
    # training-speed ingredients (modded-nanogpt, nanochat); each one is off when its key is off
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = no cap
    zero_init_proj: bool = False  # output projections (attention and FFN c_proj) start at zero
    tie_embeddings: bool = True  # output head shares the input embedding's matrix
    block_repeat: int = 1  # MobileLLM: each block is applied this many times in a row
    share_ffn: bool = False  # STLM: every layer uses the same feed-forward block
    anneal_fraction: float = 0.5  # rep_anneal: share of hidden channels whose GELU is annealed to the identity
    anneal_iters: int = 1000  # rep_anneal: training steps until those channels are exactly linear
    ffn_merged: bool = False  # set by reparam.py: the rep_* FFN is merged into its inference form
    ffn_norm_folded: bool = False  # set by reparam.py: ln_2's scale and shift are folded into the FFN
    # embedder and head: tokens, or (on bytes data) byte_tokenizer.py's pooled byte layers around the core
    embedder: str = "tokens"  # tokens | pooled: the core runs per token, or once per chunk of bytes
    boundary: str = "space"  # pooled: where chunks end: space | fixed (found from the past) | gpt2 (bytes_gpt2's markers)
    max_chunk_bytes: int = MAX_CHUNK_BYTES  # pooled, space: a chunk this long ends here
    fixed_chunk_bytes: int = FIXED_CHUNK_BYTES  # pooled, fixed: the chunk size
    byte_width: int = byte_tokenizer.BYTE_WIDTH  # width of the local byte layers
    byte_heads: int = byte_tokenizer.BYTE_HEADS
    byte_layers_in: int = byte_tokenizer.BYTE_LAYERS_IN  # local byte layers before the core
    byte_layers_out: int = byte_tokenizer.BYTE_LAYERS_OUT  # local byte layers after it
    byte_window: int = byte_tokenizer.BYTE_WINDOW  # bytes each local layer attends to

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
        choices = {"ffn": ("gelu", "relu2", "swiglu", *reparam.FFN_TYPES), "norm": ("layernorm", "rmsnorm"),
                   "pos": ("learned", "rope"), "embedder": ("tokens", "pooled")}
        if self.embedder == "pooled":
            choices["boundary"] = byte_tokenizer.BOUNDARIES
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"--{key}={getattr(self, key)} is not one of {', '.join(allowed)}")
        if self.embedder == "pooled":
            byte_tokenizer.check_data(self.boundary, self.vocab_size)
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "block_repeat", "max_chunk_bytes",
                    "fixed_chunk_bytes", "byte_width", "byte_heads", "byte_window"):
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
        if self.logit_softcap < 0:
            raise UserError(f"--logit_softcap must be 0 (off) or positive, got {self.logit_softcap}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        reparam.check_config(self)


# Named shapes. `cpu-tiny` is nanoGPT's documented CPU shape, with the fastest
# ingredients measured at that scale (ReLU squared, QK-norm; turn them off with
# --ffn=gelu --qk_norm=false for nanoGPT's own model); the stlm-* presets
# are deep and thin (MobileLLM's finding for small models) and are named by
# their parameter count at byte level, where the embedding is negligible.
PRESETS = {
    "cpu-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, ffn="relu2", qk_norm=True),
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_width = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.qk_norm = config.qk_norm

    def forward(self, x, rotary=None, cache=None, slot=0, static=False):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            # QK-norm (Dehghani et al. 2023; modded-nanogpt, nanochat): unit-RMS queries and keys bound
            # the attention logits, so a high learning rate cannot blow up the softmax
            q, k = F.rms_norm(q, (self.head_dim,), eps=NORM_EPS), F.rms_norm(k, (self.head_dim,), eps=NORM_EPS)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        start = 0
        if static:  # one token at cache.position: write it there, attend to every slot up to it
            cache.k[slot].index_copy_(2, cache.position, k)
            cache.v[slot].index_copy_(2, cache.position, v)
            y = F.scaled_dot_product_attention(q, cache.k[slot], cache.v[slot], attn_mask=cache.visible,
                                               enable_gqa=self.n_kv_head != self.n_head)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
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


def relu_squared(x):
    # ReLU squared (So et al. 2021, "Primer"; modded-nanogpt, nanochat): trains better than GELU
    # in small GPTs, and on a CPU it is two cheap elementwise ops where tanh-GELU is an expensive one
    return F.relu(x).square()


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")  # GPT-2's approximation, so GPT-2 weights load exactly


class MLP(nn.Module):
    """Feed-forward d -> 4d -> d, with GPT-2's tanh approximation of GELU or (ffn=relu2) ReLU squared."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.activation = relu_squared if config.ffn == "relu2" else gelu_tanh
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


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

    def forward(self, x, rotary=None, cache=None, slot=0, static=False):
        x = x + self.attn(self.ln_1(x), rotary, cache, slot, static)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        if config.embedder == "pooled":
            # bytes in, next-byte logits out, the core in between at chunk ends: a 256-row table, not 50k
            self.wte = byte_tokenizer.PooledBytes(
                config.n_embd, config.block_size, config.byte_width, config.byte_heads, config.byte_layers_in,
                config.byte_layers_out, config.byte_window, config.boundary, config.max_chunk_bytes,
                config.fixed_chunk_bytes, config.vocab_size)
            self.lm_head = nn.Linear(config.byte_width, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.wte.byte_embedding.weight
        else:
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.wte.weight
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()  # p=0: not even a call
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
                if config.zero_init_proj:
                    # modded-nanogpt: each block starts as the identity and its gradient
                    # grows its output from nothing, rather than adding noise to the stream
                    nn.init.zeros_(p)
        self.has_step_modules = any(isinstance(m, reparam.RepAnnealFFN) for m in self.modules())

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
        if not self.has_step_modules:
            return  # called every training step: skip walking the modules when none listens
        for module in self.modules():
            if isinstance(module, reparam.RepAnnealFFN):
                module.steps_done.fill_(steps_done)

    def hidden_states(self, idx, cache=None, static=False):
        """
        Final-norm outputs (B, T, n_embd) for token ids idx (B, T), continuing
        `cache` if given; a pooled model's are its final byte states (B, T,
        byte_width), the core run inside at chunk ends. static: one token at
        cache.position (see static_step); the caller advances the cache.
        """
        if self.config.embedder == "pooled":
            return self.wte(idx, self.core, cache)
        return self.core(self.wte(idx), cache, static)

    def new_cache(self, batch_size, device, dtype):
        """An empty KV cache for generation: the core's, or a pooled model's (its byte layers' and its core's)."""
        cache = generation.KVCache(self.config, batch_size, device, dtype)
        if self.config.embedder == "pooled":
            return byte_tokenizer.PooledCache(cache, self.config.byte_layers_in + self.config.byte_layers_out)
        return cache

    def core(self, x, cache=None, static=False):
        """The transformer core over input vectors x (B, T, n_embd): positions, blocks, final norm."""
        T = x.size(1)
        if static:
            positions = cache.position
        else:
            start = cache.length if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
            positions = torch.arange(start, start + T, device=x.device)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rotary = None
        if self.config.pos == "rope":
            rotary = (self.rope_cos[positions], self.rope_sin[positions])
        x = self.drop(x)
        slot = 0
        for block in self.h:
            for _ in range(self.config.block_repeat):
                x = block(x, rotary, cache, slot, static)
                slot += 1
        if cache is not None and not static:
            cache.length += T
        return self.ln_f(x)

    def static_step(self, token, cache):
        """
        The final hidden state (B, n_embd) of one token (B, 1) at cache.position,
        its keys and values written into the cache: the same shapes at every
        position, so a torch.compile'd static_step (generate_stream's
        compile=True) runs one fused graph per token instead of ~570 small ops.
        Call cache.begin_static_step() first, and count the token after.
        """
        return self.hidden_states(token, cache, static=True)[:, -1]

    def head(self, h):
        """Token logits from final hidden states, soft-capped when logit_softcap is set."""
        logits = self.lm_head(h)
        if self.config.logit_softcap:
            # Gemma 2, modded-nanogpt: a smooth bound on the logits keeps early, overconfident
            # predictions from dominating the loss; ~tanh's identity for small logits
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, idx, targets=None, reduction="mean"):
        """
        Logits (B, T, vocab) and, when targets are given, the cross-entropy in
        nats: the mean per token, or the sum with reduction="sum". A pooled
        model's tokens are bytes, so its loss is nats per byte like a bytes model's.
        """
        logits = self.head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
        return logits, loss

    def next_token(self, h, temperature=1.0, top_k=None, top_p=None, generator=None):
        """Sample the (B, 1) token that follows final hidden states h (B, n_embd), or a pooled model's byte states."""
        return generation.sample_next(self.head(h), temperature, top_k, top_p, generator)

    def generate_stream(self, idx, max_new_tokens, **options):
        """Sampled tokens one at a time: generation.generate_stream (KV cache, windowing, sampling)."""
        return generation.generate_stream(self, idx, max_new_tokens, **options)

    def generate(self, idx, max_new_tokens, **options):
        """The prompt followed by max_new_tokens sampled tokens: generation.generate."""
        return generation.generate(self, idx, max_new_tokens, **options)


# ----------------------------------------------------------------------------
# checkpoints

def model_from_checkpoint(checkpoint):
    """The GPT stored in a checkpoint dict, in eval mode."""
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()


# ----------------------------------------------------------------------------

def main(argv=None):
    parse_config([], sys.argv[1:] if argv is None else argv, usage=__doc__)  # no settings: only --help
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
    run(main)
