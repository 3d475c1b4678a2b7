"""
Tests for model.py: shapes, causality, tying and sharing, preset sizes, a
Hugging Face GPT-2 reference on copied weights, config validation, checkpoints
and the training-speed ingredients (generation and the KV cache:
test_generation.py).

Every model here is tiny (2-3 layers, width 32-64, context 16-32) so the whole
file runs in seconds on one thread.
"""

import dataclasses
import math
import os
import pickle
import zipfile

import pytest
import torch

from cli import UserError
from conftest import VARIANT_PARAMS, VARIANTS, VOCAB, lively_model, random_ids, tiny_config, tiny_model
from model import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    GPT,
    PRESETS,
    CausalSelfAttention,
    GPTConfig,
    KVCache,
    apply_rotary,
    load_checkpoint,
    model_from_checkpoint,
    preset_config,
    rotary_tables,
    save_checkpoint,
)

# ----------------------------------------------------------------------------
# 1. shapes and the initial loss

@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_logits_shape_and_initial_loss(variant):
    model = tiny_model(**variant)
    idx, targets = random_ids(3, 20), random_ids(3, 20)
    with torch.no_grad():
        logits, loss = model(idx, targets)
        logits_only, no_loss = model(idx)
    assert logits.shape == (3, 20, VOCAB)
    assert no_loss is None
    assert torch.equal(logits, logits_only)
    assert loss.shape == () and loss.dtype == torch.float32
    # small random init: the predictions are nearly uniform
    assert abs(loss.item() - math.log(VOCAB)) < 0.1, loss.item()
    assert model.hidden_states(idx).shape == (3, 20, 32)


def test_loss_ignores_targets_of_minus_one():
    # float64: the two means add the same 12 terms in another order, which moves them by about 1e-16
    model = tiny_model().double()
    idx, targets = random_ids(2, 10), random_ids(2, 10)
    masked = targets.clone()
    masked[:, :4] = -1
    with torch.no_grad():
        logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), targets[:, 4:].flatten())
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)


def test_full_context_works_and_longer_is_refused():
    model = tiny_model(block_size=16)
    with torch.no_grad():
        assert model(random_ids(1, 16))[0].shape == (1, 16, VOCAB)
        with pytest.raises(ValueError, match="block_size"):
            model(random_ids(1, 17))
        cache = KVCache(model.config, 1, "cpu", torch.float32)
        model.hidden_states(random_ids(1, 10), cache)
        with pytest.raises(ValueError, match="block_size"):
            model.hidden_states(random_ids(1, 7), cache)  # 10 cached + 7 new > 16


# ----------------------------------------------------------------------------
# 2. causality: a token never influences the logits before it

@pytest.mark.exercise(13)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_causal_future_tokens_do_not_leak(variant):
    model = tiny_model(**variant)
    T = 12
    idx = random_ids(2, T)
    with torch.no_grad():
        base = model(idx)[0]
        for t in (0, 1, 5, T - 1):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % VOCAB
            out = model(changed)[0]
            assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} saw token {t}"
            assert (out[:, t] - base[:, t]).abs().max() > 1e-4, f"position {t} ignores its own token"
            if t + 1 < T:
                assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-4, f"later positions ignore token {t}"


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_batch_rows_are_independent(variant):
    model = tiny_model(**variant)
    idx = random_ids(2, 10)
    changed = idx.clone()
    changed[1] = random_ids(1, 10)[0]
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    # the same shapes and, for row 0, the same numbers through the same kernels: equal to the bit
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------
# 3. tied embeddings

@pytest.mark.exercise(3)
def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    n_tied, n_untied = tied.num_params(), untied.num_params()
    all_unique = {p.data_ptr(): p.numel() for p in tied.parameters()}
    assert n_tied["total"] == sum(all_unique.values())
    assert n_untied["total"] - n_tied["total"] == VOCAB * 32
    assert n_untied["core"] == n_tied["core"]
    # embedding = token table (+ head when untied) + learned positions
    assert n_tied["embedding"] == VOCAB * 32 + 32 * 32
    assert n_untied["embedding"] == 2 * VOCAB * 32 + 32 * 32
    assert n_tied["embedding"] + n_tied["core"] == n_tied["total"]


def test_tied_head_receives_gradient_through_both_uses():
    model = tiny_model()
    idx = random_ids(2, 8)
    _, loss = model(idx, random_ids(2, 8))
    loss.backward()
    assert model.lm_head.weight.grad is model.wte.weight.grad
    # rows of tokens that never appear in the input still get a gradient from the head
    unused = sorted(set(range(VOCAB)) - set(idx.flatten().tolist()))
    assert model.wte.weight.grad[unused].abs().sum() > 0


# ----------------------------------------------------------------------------
# 4. weight sharing

@pytest.mark.exercise(3)
def test_share_ffn_shares_one_module_and_its_updates():
    plain, shared = tiny_model(n_layer=3), tiny_model(n_layer=3, share_ffn=True)
    assert all(block.ffn is shared.h[0].ffn for block in shared.h)
    assert len({id(block.ffn) for block in plain.h}) == 3
    ffn_size = sum(p.numel() for p in plain.h[0].ffn.parameters())
    assert plain.num_params()["core"] - shared.num_params()["core"] == 2 * ffn_size

    # the shared weight's gradient is the sum of what each layer's copy would get; in float64, where
    # adding the three parts in another order moves the sum by about 1e-16 of its size
    shared.double()
    unshared = tiny_model(n_layer=3).double()
    unshared.load_state_dict(shared.state_dict())  # every layer gets the shared FFN's weights
    idx, targets = random_ids(2, 10), random_ids(2, 10)
    shared.train(), unshared.train()
    shared(idx, targets)[1].backward()
    unshared(idx, targets)[1].backward()
    expected = sum(block.ffn.c_fc.weight.grad for block in unshared.h)
    torch.testing.assert_close(shared.h[0].ffn.c_fc.weight.grad, expected, atol=1e-12, rtol=1e-10)

    before = shared.h[0].ffn.c_fc.weight.detach().clone()
    torch.optim.SGD(shared.parameters(), lr=0.5).step()
    after = [block.ffn.c_fc.weight for block in shared.h]
    assert not torch.equal(after[0], before)
    assert all(w is after[0] and w.data_ptr() == after[0].data_ptr() for w in after)


@pytest.mark.exercise(3)
def test_block_repeat_adds_depth_not_parameters():
    once, twice = tiny_model(block_repeat=1), tiny_model(block_repeat=2)
    assert once.num_params() == twice.num_params()
    twice.load_state_dict(once.state_dict())  # same keys, same weights
    idx = random_ids(2, 10)
    with torch.no_grad():
        out_once, out_twice = once(idx)[0], twice(idx)[0]
        # reference: each block applied twice in a row, by hand
        x = once.wte(idx) + once.wpe(torch.arange(10))
        for block in once.h:
            x = block(block(x))
        reference = once.lm_head(once.ln_f(x))
    assert (out_once - out_twice).abs().max() > 1e-3
    assert torch.equal(out_twice, reference)  # the same operations in the same order: equal to the bit
    cache = KVCache(twice.config, 1, "cpu", torch.float32)
    assert cache.k.shape[0] == twice.config.n_layer * 2


@pytest.mark.exercise(13)
def test_gqa_equals_attention_with_repeated_kv_heads():
    """Query head h reads key/value head h // (n_head / n_kv_head): check against plain multi-head attention."""
    gqa = tiny_model(n_head=4, n_kv_head=2, pos="rope").double()
    mha = tiny_model(n_head=4, pos="rope").double()
    state = gqa.state_dict()
    hd, group = 8, 2
    for i in range(2):
        key = f"h.{i}.attn.c_attn.weight"
        q, k, v = state[key].split([4 * hd, 2 * hd, 2 * hd])
        k = k.view(2, hd, -1).repeat_interleave(group, dim=0).reshape(4 * hd, -1)
        v = v.view(2, hd, -1).repeat_interleave(group, dim=0).reshape(4 * hd, -1)
        state[key] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    idx = random_ids(2, 12)
    # float64: the two attention kernels may sum in other orders (1e-16 relative); a query head reading
    # the wrong key/value head moves the logits by 1e-2 or more
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-12, rtol=0)


@pytest.mark.exercise(6)
def test_rope_scores_depend_only_on_relative_position():
    config = tiny_config(pos="rope", block_size=32)
    model = GPT(config)
    # the tables against the definition, cos and sin of position x 10000^(-2i/d) in float64: float32
    # rounds a value in [-1, 1] by at most 2^-25, so 2^-24 is a bound with room
    d = config.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.float64) / d
    angles = torch.arange(32, dtype=torch.float64)[:, None] * 10000.0 ** -exponents
    torch.testing.assert_close(model.rope_cos.double(), angles.cos(), atol=2**-24, rtol=0)
    torch.testing.assert_close(model.rope_sin.double(), angles.sin(), atol=2**-24, rtol=0)
    # apply_rotary on float64 tables: the relative-position property holds to float64's rounding
    cos, sin = angles.cos(), angles.sin()
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(m, n):
        return apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])

    torch.testing.assert_close(score(7, 3), score(20, 16), atol=1e-12, rtol=0)
    torch.testing.assert_close(score(3, 3), q @ k, atol=1e-12, rtol=0)  # zero offset: no rotation left
    assert abs(score(7, 3) - score(7, 4)) > 1e-4
    assert torch.equal(apply_rotary(q, cos[0], sin[0]), q)  # position 0: cos 1 and sin 0 exactly


@pytest.mark.exercise(6)
def test_rotary_tables_are_float64_angles_rounded_once():
    config = tiny_config(pos="rope", block_size=4096)  # head_dim 8
    cos, sin = rotary_tables(config)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (4096, 4)
    exponents = torch.arange(0, 8, 2, dtype=torch.float64) / 8
    angles = torch.arange(4096, dtype=torch.float64)[:, None] * 10000.0 ** -exponents
    # rounding a value in [-1, 1] to float32 moves it by at most 2^-25, so 2^-24 has room; angles computed in
    # float32 are off by their relative error (6e-8) times the angle, up to 2e-4 at position 4095
    torch.testing.assert_close(cos.double(), angles.cos(), atol=2**-24, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin(), atol=2**-24, rtol=0)


@pytest.mark.exercise(6)
def test_apply_rotary_turns_each_pair_forward_as_llama_does():
    # channel 0 alone turns toward channel d/2, its pair's second half: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
    angles = torch.tensor([[0.3, 1.1]], dtype=torch.float64)  # one position, head_dim 4
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    turned = apply_rotary(x, angles.cos(), angles.sin())
    torch.testing.assert_close(turned, torch.tensor([[math.cos(0.3), 0.0, math.sin(0.3), 0.0]], dtype=torch.float64),
                               atol=1e-15, rtol=0)
    y = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)  # the second half of pair 1: toward its first
    torch.testing.assert_close(apply_rotary(y, angles.cos(), angles.sin()),
                               torch.tensor([[0.0, -math.sin(1.1), 0.0, math.cos(1.1)]], dtype=torch.float64),
                               atol=1e-15, rtol=0)
    # Hugging Face Llama's formula (rotate_half), on (B, heads, T, head_dim) with (T, head_dim / 2) tables
    x, angles = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    rotate_half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    expected = x * angles.cos().repeat(1, 2) + rotate_half * angles.sin().repeat(1, 2)
    # float64: the same products and sums, grouped another way, about 1e-16 apart
    torch.testing.assert_close(apply_rotary(x, angles.cos(), angles.sin()), expected, atol=1e-12, rtol=0)


class ListCache:
    """What attention asks of a KV cache, as plain concatenation: each slot's keys and values, and their count."""

    def __init__(self):
        self.length, self.k, self.v = 0, {}, {}

    def store(self, slot, k, v):
        self.k[slot] = torch.cat([self.k[slot], k], dim=2) if slot in self.k else k
        self.v[slot] = torch.cat([self.v[slot], v], dim=2) if slot in self.v else v
        return self.k[slot], self.v[slot]


def loop_attention(attn, x, rotary, qk_norm):
    """Causal self-attention one query at a time: softmax(q . k / sqrt(d)) over the keys at or before it."""
    B, T, C = x.shape
    H, G, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = (x @ attn.c_attn.weight.T).split([C, G * D, G * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
    if qk_norm:
        q, k = (t / (t.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() for t in (q, k))
    if rotary is not None:
        cos, sin = (table[:, None, :] for table in rotary)  # (T, 1, D / 2): every head alike
        q, k = (torch.cat([t[..., :D // 2] * cos - t[..., D // 2:] * sin,
                           t[..., :D // 2] * sin + t[..., D // 2:] * cos], dim=-1) for t in (q, k))
    y = torch.zeros(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)  # query heads share key/value heads in groups
            for t in range(T):
                scores = torch.stack([q[b, t, h] @ k[b, s, g] for s in range(t + 1)]) / math.sqrt(D)
                y[b, t, h] = scores.softmax(0) @ v[b, :t + 1, g]
    return y.reshape(B, T, C) @ attn.c_proj.weight.T


@pytest.mark.exercise(13)
@pytest.mark.parametrize("variant", [dict(), dict(n_kv_head=2), dict(n_kv_head=1), dict(qk_norm=True),
                                     dict(pos="rope", n_kv_head=2)], ids=["mha", "gqa", "mqa", "qk_norm", "rope"])
def test_attention_equals_a_plain_loop_whole_and_in_pieces(variant):
    config = tiny_config(**variant)
    attn = CausalSelfAttention(config).double()
    with torch.no_grad():  # weights large enough that attention is far from uniform
        attn.c_attn.weight.normal_(0.0, 0.3)
    T = 11
    x = torch.randn(2, T, config.n_embd, dtype=torch.float64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** -(torch.arange(0, 8, 2) / 8)

    def rows(a, b):  # the rotary tables' rows of positions a .. b - 1
        return (angles[a:b].cos(), angles[a:b].sin()) if config.pos == "rope" else None

    expected = loop_attention(attn, x, rows(0, T), config.qk_norm)
    # float64: the loop adds the same terms in another order, about 1e-15 apart; a wrong mask, scale or head, 1e-2
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rows(0, T)), expected, atol=1e-12, rtol=0)
        # after a cached prefix: a chunk of 3 (it sees the prefix and its own past), then one token at a time
        cache, pieces = ListCache(), []
        for a, b in [(0, 5), (5, 8), *((t, t + 1) for t in range(8, T))]:
            pieces.append(attn(x[:, a:b], rows(a, b), cache, slot=0))
            cache.length = b  # the model advances the cache once every layer has stored
        torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------
# 5. presets

@pytest.mark.exercise(3)
@pytest.mark.parametrize("name, target", [("stlm-10m", 10e6), ("stlm-50m", 50e6), ("stlm-100m", 100e6)])
def test_stlm_presets_are_the_size_of_their_names(name, target):
    config = preset_config(name)
    assert config.vocab_size == 256
    with torch.device("meta"):  # count parameters without allocating or initialising them
        model = GPT(config)
    total = model.num_params()["total"]
    assert abs(total - target) / target < 0.10, f"{name} has {total:,} parameters"


def test_cpu_tiny_is_nanogpt_cpu_shape():
    config = preset_config("cpu-tiny")
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (4, 4, 128, 64)
    assert preset_config("cpu-tiny", vocab_size=50257, dropout=0.1).vocab_size == 50257
    assert set(PRESETS) >= {"cpu-tiny", "stlm-10m", "stlm-50m", "stlm-100m"}


# ----------------------------------------------------------------------------
# 6. Hugging Face GPT-2 on copied weights

def copy_hf_gpt2_into(hf, ours):
    """Copy a transformers GPT2LMHeadModel's weights into our GPT (Conv1D stores (in, out): transpose)."""
    src = hf.transformer
    with torch.no_grad():
        ours.wte.weight.copy_(src.wte.weight)
        ours.wpe.weight.copy_(src.wpe.weight)
        for mine, theirs in zip(ours.h, src.h, strict=True):
            for a, b in ((mine.ln_1, theirs.ln_1), (mine.ln_2, theirs.ln_2)):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
            for a, b in ((mine.attn.c_attn, theirs.attn.c_attn), (mine.attn.c_proj, theirs.attn.c_proj),
                         (mine.ffn.c_fc, theirs.mlp.c_fc), (mine.ffn.c_proj, theirs.mlp.c_proj)):
                a.weight.copy_(b.weight.t())
                a.bias.copy_(b.bias)
        ours.ln_f.weight.copy_(src.ln_f.weight)
        ours.ln_f.bias.copy_(src.ln_f.bias)
    assert ours.lm_head.weight is ours.wte.weight  # the head follows the tied embedding


def hf_gpt2_and_ours():
    """
    A random transformers GPT-2 (biases and norms randomised too) and our GPT holding a copy of its
    weights, both in float64: the two add the same terms in other orders, which float64 keeps at 1e-16.
    """
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: no GPT-2 reference")
    # initializer_range 0.1 rather than GPT-2's 0.02: with tiny weights every activation sits where
    # GELU's tanh approximation and the exact GELU agree to 1e-6, and the test could not tell them apart
    hf_config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=VOCAB,
                                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, activation_function="gelu_new",
                                        initializer_range=0.1, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # GPT-2 starts with zero biases and unit norms: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif ".ln_" in name:
                p.normal_(1.0, 0.1)
    ours = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, bias=True,
                         norm="layernorm", pos="learned", ffn="gelu", tie_embeddings=True)).eval()
    assert ours.num_params()["total"] == sum(p.numel() for p in hf.parameters())
    copy_hf_gpt2_into(hf, ours)
    return hf.double(), ours.double()


def paired_parameters(hf, ours):
    """(ours, theirs as ours stores it) for every parameter: Conv1D weights transposed, the tied head once."""
    theirs = dict(hf.named_parameters())
    pairs = []
    for name, p in ours.named_parameters():
        hf_name = "transformer." + name.replace(".ffn.c_", ".mlp.c_")
        q = theirs[hf_name]
        conv1d = name.endswith("weight") and (".c_attn." in name or ".c_proj." in name or ".c_fc." in name)
        pairs.append((name, p, (lambda t: t.t()) if conv1d else (lambda t: t), q))
    return pairs


def next_token_loss(logits, idx):
    """The mean next-token cross-entropy of logits (B, T, vocab) on idx (B, T), in the logits' dtype."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


def test_matches_hugging_face_gpt2():
    hf, ours = hf_gpt2_and_ours()
    idx = random_ids(2, 32)
    with torch.no_grad():
        theirs = hf(idx, labels=idx)
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
        full_logits = ours(idx)[0]
    # logits of order 1-10 in float64: rounding differences of about 1e-15; exact GELU for tanh-GELU,
    # or a norm's epsilon of 1e-6 for 1e-5, would show as 1e-4 or more
    torch.testing.assert_close(full_logits, theirs.logits, atol=1e-12, rtol=0)
    torch.testing.assert_close(loss, next_token_loss(theirs.logits, idx), atol=1e-12, rtol=0)
    # HF shifts the labels itself, and computes its loss in float32 (it upcasts the logits): a loss
    # near ln(101) = 4.6 rounds there by about 1e-6
    assert abs(loss.item() - theirs.loss.item()) < 1e-5


def test_gradients_and_an_adamw_step_match_hugging_face_gpt2():
    """As llm.c checks its C against PyTorch: the same gradients, then the same weights after one step."""
    import optim
    import train
    hf, ours = hf_gpt2_and_ours()
    idx = random_ids(2, 32)
    # HF's own loss rounds through float32 (see above): the same loss, written here, keeps float64
    next_token_loss(hf(idx).logits, idx).backward()
    ours(idx[:, :-1], idx[:, 1:])[1].backward()
    pairs = paired_parameters(hf, ours)
    for name, mine, as_ours, theirs in pairs:
        # gradients of order 0.1 in float64: rounding differences of about 1e-16
        torch.testing.assert_close(mine.grad, as_ours(theirs.grad), atol=1e-12, rtol=0, msg=name)
    # train.py's optimizer on ours; torch's AdamW with the documented groups (matrices decay) on the reference
    config = train.TrainConfig(optimizer="adamw")
    optim.make_optimizer(ours, config, "cpu").step()
    groups = [{"params": [p for p in hf.parameters() if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in hf.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    torch.optim.AdamW(groups, lr=config.learning_rate, betas=optim.ADAMW_BETAS).step()
    for name, mine, as_ours, theirs in pairs:
        # Adam's first step is lr * g / (|g| + eps): two gradients that differ by d (at most 1e-16 or so
        # here) give steps that differ by at most lr * d / eps = 1e-8 lr. That covers the key bias too,
        # whose true gradient is 0 (softmax ignores a shift shared by a query's scores): both models hold
        # rounding noise there, which the step magnifies most.
        torch.testing.assert_close(mine, as_ours(theirs), atol=1e-6 * config.learning_rate, rtol=0, msg=name)


# ----------------------------------------------------------------------------
# 7. config validation

@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=30, n_head=4), r"--n_embd=30 must be divisible by --n_head=4"),
    (dict(n_head=4, n_kv_head=3), r"--n_head=4 must be divisible by --n_kv_head=3"),
    (dict(ffn="relu"), r"--ffn=relu is not one of gelu, relu2, swiglu"),
    (dict(norm="batchnorm"), r"--norm=batchnorm is not one of layernorm, rmsnorm"),
    (dict(pos="alibi"), r"--pos=alibi is not one of learned, rope"),
    (dict(n_layer=0), r"--n_layer must be at least 1"),
    (dict(dropout=1.0), r"--dropout must be in \[0, 1\)"),
    (dict(pos="rope", n_embd=36, n_head=4), r"rotary positions need an even head size"),
], ids=["n_embd%n_head", "n_head%n_kv_head", "ffn", "norm", "pos", "n_layer", "dropout", "rope-odd-head"])
def test_bad_config_is_a_user_error(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        GPT(tiny_config(**overrides))
    assert "\n" not in str(info.value)


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match=r"unknown preset 'stlm-7b'.*cpu-tiny") as info:
        preset_config("stlm-7b")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------
# 8. checkpoints

def checkpoint_of(model):
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "step": 7}


@pytest.fixture
def checkpoint_file(tmp_path):
    path = tmp_path / "real.pt"
    save_checkpoint(checkpoint_of(tiny_model()), path)
    return path


@pytest.mark.parametrize("variant", [pytest.param(VARIANTS[k], id=k) for k in ("learned-gelu-layernorm", "stlm-like")]
                         + [pytest.param(dict(tie_embeddings=False, bias=True), id="untied-bias")])
def test_checkpoint_round_trip(tmp_path, variant):
    model = tiny_model(**variant)
    path = tmp_path / "runs" / "ckpt.pt"  # the parent folder does not exist yet
    save_checkpoint(checkpoint_of(model), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp file left behind
    checkpoint = load_checkpoint(path)
    assert checkpoint["format"] == CHECKPOINT_FORMAT and checkpoint["version"] == CHECKPOINT_VERSION
    assert checkpoint["step"] == 7
    loaded = model_from_checkpoint(checkpoint)
    assert not loaded.training
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_embeddings
    idx = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_save_checkpoint_replaces_an_existing_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4))
    entries = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}
    save_checkpoint({**entries, "step": 1}, path)
    save_checkpoint({**entries, "step": 2}, path)
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


class NotATensor:  # pickled by torch.save, refused by weights_only loading
    pass


def assert_one_line_user_error(path):
    with pytest.raises(UserError) as info:  # a UserError and nothing else
        load_checkpoint(path)
    message = str(info.value)
    assert message and "\n" not in message
    return message


NOT_TORCH = "is not a torch checkpoint file (truncated, or another kind of file)"


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.0001])
def test_truncated_checkpoint_is_a_user_error(tmp_path, checkpoint_file, fraction):
    data = checkpoint_file.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[:int(len(data) * fraction)])
    assert assert_one_line_user_error(bad) == f"{bad} {NOT_TORCH}"


def write_foreign_file(path, kind):
    if kind == "random-bytes":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "plain-pickle":  # pickle's own format, not torch's
        path.write_bytes(pickle.dumps({"model": [1.0, 2.0]}))
    elif kind == "zip-of-text":  # a zip archive, as torch's files are, holding no checkpoint
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not a checkpoint")
    elif kind == "plain-dict":
        torch.save({"model": tiny_model().state_dict(), "step": 3}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "pickled-object":
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "x": NotATensor()}, path)
    elif kind == "old-version":
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION + 1}, path)
    elif kind == "no-model":
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 3}, path)


NOT_OURS = f"is not a checkpoint written by this project (no '{CHECKPOINT_FORMAT}' marker)"
FOREIGN_FILES = {  # what each kind of file is called
    "random-bytes": NOT_TORCH, "empty": NOT_TORCH, "plain-pickle": NOT_TORCH,
    "zip-of-text": "is not a readable checkpoint", "plain-dict": NOT_OURS, "tensor": NOT_OURS,
    "pickled-object": "was refused: it holds pickled Python objects",
    "old-version": f"has checkpoint version {CHECKPOINT_VERSION + 1}, this code reads {CHECKPOINT_VERSION}",
    "no-model": "holds no model",
}


@pytest.mark.parametrize("kind", FOREIGN_FILES)
def test_foreign_file_is_a_user_error(tmp_path, kind):
    bad = tmp_path / f"{kind}.pt"
    write_foreign_file(bad, kind)
    line = assert_one_line_user_error(bad)
    assert line.startswith(str(bad)) and FOREIGN_FILES[kind] in line
    # only a file that really holds pickled objects is called a risk
    assert ("pickled" in line) == (kind == "pickled-object")


def test_missing_checkpoint_is_a_user_error(tmp_path):
    missing = assert_one_line_user_error(tmp_path / "nowhere" / "ckpt.pt")
    assert missing.startswith(f"no checkpoint at {tmp_path / 'nowhere' / 'ckpt.pt'} (no such file)")
    folder = assert_one_line_user_error(tmp_path)
    assert folder.startswith(f"no checkpoint at {tmp_path} (a folder, not a checkpoint file)")
    # every script that loads a checkpoint says this, and not all of them have a --ckpt option
    assert "--ckpt" not in missing + folder


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    model = tiny_model()
    (tmp_path / "a_file").write_text("a file where a folder should be")
    for path in (tmp_path / "a_file" / "ckpt.pt", tmp_path / "a_file" / "deeper" / "ckpt.pt"):
        with pytest.raises(UserError, match=f"could not write {path} .*no checkpoint written") as info:
            save_checkpoint(checkpoint_of(model), path)
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: no refusal to see")
def test_a_read_only_folder_is_could_not_write_not_disk_full(tmp_path):
    # torch's own open of an unwritable file raises a RuntimeError much like a full disk's
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError, match="could not write .*Permission denied.*no checkpoint written"):
            save_checkpoint(checkpoint_of(tiny_model()), folder / "ckpt.pt")
    finally:
        folder.chmod(0o700)


# ----------------------------------------------------------------------------
# training-speed ingredients, each against a hand-written reference

# float64 for each: the reference adds the same products in another order, which moves a value of
# order 1-10 by about 1e-15; a wrong formula moves it by 1e-2 or more

def test_relu_squared_ffn_by_hand():
    model = lively_model(ffn="relu2").double()
    ffn, x = model.h[0].ffn, torch.randn(2, 5, 32, dtype=torch.float64)
    hidden = x @ ffn.c_fc.weight.T
    expected = (torch.where(hidden > 0, hidden, 0.0) * torch.where(hidden > 0, hidden, 0.0)) @ ffn.c_proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), expected, atol=1e-12, rtol=0)


@pytest.mark.exercise(13)
def test_qk_norm_attention_by_hand():
    model = lively_model(qk_norm=True).double()
    attn, (B, T, C, H) = model.h[0].attn, (2, 7, 32, 4)
    D = C // H
    x = torch.randn(B, T, C, dtype=torch.float64)
    q, k, v = (x @ attn.c_attn.weight.detach().T).split(C, dim=-1)
    y = torch.zeros(B, T, C, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            heads = slice(h * D, (h + 1) * D)
            # each head's query and key rows scaled to unit root-mean-square
            qh = q[b, :, heads] / (q[b, :, heads].pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
            kh = k[b, :, heads] / (k[b, :, heads].pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
            for t in range(T):
                scores = torch.stack([qh[t] @ kh[s] / math.sqrt(D) for s in range(t + 1)])
                y[b, t, heads] = scores.softmax(0) @ v[b, :t + 1, heads]
    with torch.no_grad():
        torch.testing.assert_close(attn(x), y @ attn.c_proj.weight.detach().T, atol=1e-12, rtol=0)
