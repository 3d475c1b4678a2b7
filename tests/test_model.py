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

import pytest
import torch

from cli import UserError
from conftest import VARIANT_PARAMS, VARIANTS, VOCAB, lively_model, random_ids, tiny_config, tiny_model
from generation import KVCache
from model import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    GPT,
    PRESETS,
    GPTConfig,
    apply_rotary,
    load_checkpoint,
    model_from_checkpoint,
    preset_config,
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
    model = tiny_model()
    idx, targets = random_ids(2, 10), random_ids(2, 10)
    masked = targets.clone()
    masked[:, :4] = -1
    with torch.no_grad():
        logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), targets[:, 4:].flatten())
    torch.testing.assert_close(loss, expected)


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
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------
# 3. tied embeddings

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

def test_share_ffn_shares_one_module_and_its_updates():
    plain, shared = tiny_model(n_layer=3), tiny_model(n_layer=3, share_ffn=True)
    assert all(block.mlp is shared.h[0].mlp for block in shared.h)
    assert len({id(block.mlp) for block in plain.h}) == 3
    ffn_size = sum(p.numel() for p in plain.h[0].mlp.parameters())
    assert plain.num_params()["core"] - shared.num_params()["core"] == 2 * ffn_size

    # the shared weight's gradient is the sum of what each layer's copy would get
    unshared = tiny_model(n_layer=3)
    unshared.load_state_dict(shared.state_dict())  # every layer gets the shared FFN's weights
    idx, targets = random_ids(2, 10), random_ids(2, 10)
    shared.train(), unshared.train()
    shared(idx, targets)[1].backward()
    unshared(idx, targets)[1].backward()
    expected = sum(block.mlp.c_fc.weight.grad for block in unshared.h)
    torch.testing.assert_close(shared.h[0].mlp.c_fc.weight.grad, expected, atol=1e-7, rtol=1e-5)

    before = shared.h[0].mlp.c_fc.weight.detach().clone()
    torch.optim.SGD(shared.parameters(), lr=0.5).step()
    after = [block.mlp.c_fc.weight for block in shared.h]
    assert not torch.equal(after[0], before)
    assert all(w is after[0] and w.data_ptr() == after[0].data_ptr() for w in after)


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
    torch.testing.assert_close(out_twice, reference, atol=1e-6, rtol=0)
    cache = KVCache(twice.config, 1, "cpu", torch.float32)
    assert cache.k.shape[0] == twice.config.n_layer * 2


def test_gqa_equals_attention_with_repeated_kv_heads():
    """Query head h reads key/value head h // (n_head / n_kv_head): check against plain multi-head attention."""
    gqa = tiny_model(n_head=4, n_kv_head=2, pos="rope")
    mha = tiny_model(n_head=4, pos="rope")
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
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    config = tiny_config(pos="rope", block_size=32)
    model = GPT(config)
    cos, sin = model.rope_cos, model.rope_sin
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        return apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])

    torch.testing.assert_close(score(7, 3), score(20, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(score(3, 3), q @ k, atol=1e-5, rtol=0)  # zero offset: no rotation left
    assert abs(score(7, 3) - score(7, 4)) > 1e-4
    torch.testing.assert_close(apply_rotary(q, cos[0], sin[0]), q)  # position 0 is the identity


# ----------------------------------------------------------------------------
# 5. presets

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
                         (mine.mlp.c_fc, theirs.mlp.c_fc), (mine.mlp.c_proj, theirs.mlp.c_proj)):
                a.weight.copy_(b.weight.t())
                a.bias.copy_(b.bias)
        ours.ln_f.weight.copy_(src.ln_f.weight)
        ours.ln_f.bias.copy_(src.ln_f.bias)
    assert ours.lm_head.weight is ours.wte.weight  # the head follows the tied embedding


def hf_gpt2_and_ours():
    """A random transformers GPT-2 (biases and norms randomised too) and our GPT holding a copy of its weights."""
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
    return hf, ours


def paired_parameters(hf, ours):
    """(ours, theirs as ours stores it) for every parameter: Conv1D weights transposed, the tied head once."""
    theirs = dict(hf.named_parameters())
    pairs = []
    for name, p in ours.named_parameters():
        hf_name = "transformer." + name.replace(".attn.c_", ".attn.c_").replace(".mlp.c_", ".mlp.c_")
        q = theirs[hf_name]
        conv1d = name.endswith("weight") and (".c_attn." in name or ".c_proj." in name or ".c_fc." in name)
        pairs.append((name, p, (lambda t: t.t()) if conv1d else (lambda t: t), q))
    return pairs


def test_matches_hugging_face_gpt2():
    hf, ours = hf_gpt2_and_ours()
    idx = random_ids(2, 32)
    with torch.no_grad():
        theirs = hf(idx, labels=idx)
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
        full_logits = ours(idx)[0]
    assert (full_logits - theirs.logits).abs().max().item() < 1e-5
    torch.testing.assert_close(loss, theirs.loss, atol=1e-5, rtol=0)  # HF shifts the labels itself


def test_gradients_and_an_adamw_step_match_hugging_face_gpt2():
    """As llm.c checks its C against PyTorch: the same gradients, then the same weights after one step."""
    import train
    hf, ours = hf_gpt2_and_ours()
    idx = random_ids(2, 32)
    hf(idx, labels=idx).loss.backward()
    ours(idx[:, :-1], idx[:, 1:])[1].backward()
    pairs = paired_parameters(hf, ours)
    for name, mine, as_ours, theirs in pairs:
        torch.testing.assert_close(mine.grad, as_ours(theirs.grad), atol=1e-5, rtol=1e-4, msg=name)
    # train.py's optimizer on ours; torch's AdamW with the documented groups (matrices decay) on the reference
    config = train.TrainConfig(optimizer="adamw")
    train.make_optimizer(ours, config, "cpu").step()
    groups = [{"params": [p for p in hf.parameters() if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in hf.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2)).step()
    n_embd = ours.config.n_embd
    for name, mine, as_ours, theirs in pairs:
        mine, theirs = mine.detach().clone(), as_ours(theirs.detach()).clone()
        if name.endswith("c_attn.bias"):
            # the key bias adds the same amount to every score of a query, so softmax ignores it: its true
            # gradient is 0, both models hold only rounding noise (~1e-9) there, and Adam's first step,
            # g / (|g| + eps), turns that noise into a step of either sign: not comparable
            mine[n_embd:2 * n_embd] = theirs[n_embd:2 * n_embd] = 0
        # Adam's first step is lr * g / (|g| + eps) per weight: where |g| is near eps (1e-8), float32 rounding
        # in the gradient (summed in another order) moves it, so steps agree to 1% of lr, not to the last digit
        torch.testing.assert_close(mine, theirs, atol=0.01 * config.learning_rate, rtol=0, msg=name)


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


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.0001])
def test_truncated_checkpoint_is_a_user_error(tmp_path, checkpoint_file, fraction):
    data = checkpoint_file.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[:int(len(data) * fraction)])
    assert str(bad) in assert_one_line_user_error(bad)


@pytest.mark.parametrize("kind", ["random-bytes", "empty", "plain-dict", "tensor", "pickled-object", "old-version",
                                  "no-model"])
def test_foreign_file_is_a_user_error(tmp_path, kind):
    bad = tmp_path / f"{kind}.pt"
    if kind == "random-bytes":
        bad.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "plain-dict":
        torch.save({"model": tiny_model().state_dict(), "step": 3}, bad)
    elif kind == "tensor":
        torch.save(torch.zeros(3), bad)
    elif kind == "pickled-object":
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "x": NotATensor()}, bad)
    elif kind == "old-version":
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION + 1}, bad)
    elif kind == "no-model":
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 3}, bad)
    message = assert_one_line_user_error(bad)
    if kind in ("plain-dict", "tensor"):
        assert CHECKPOINT_FORMAT in message
    if kind == "old-version":
        assert "version" in message
    if kind == "no-model":
        assert "holds no model" in message


def test_missing_checkpoint_is_a_user_error(tmp_path):
    assert "no checkpoint" in assert_one_line_user_error(tmp_path / "nowhere" / "ckpt.pt")
    assert "no checkpoint" in assert_one_line_user_error(tmp_path)  # a folder is not a checkpoint


# ----------------------------------------------------------------------------
# training-speed ingredients, each against a hand-written reference

def test_relu_squared_ffn_by_hand():
    model = lively_model(ffn="relu2")
    mlp, x = model.h[0].mlp, torch.randn(2, 5, 32)
    hidden = x @ mlp.c_fc.weight.T
    expected = (torch.where(hidden > 0, hidden, 0.0) * torch.where(hidden > 0, hidden, 0.0)) @ mlp.c_proj.weight.T
    with torch.no_grad():
        assert torch.allclose(mlp(x), expected, atol=1e-6)


def test_qk_norm_attention_by_hand():
    model = lively_model(qk_norm=True)
    attn, (B, T, C, H) = model.h[0].attn, (2, 7, 32, 4)
    D = C // H
    x = torch.randn(B, T, C)
    q, k, v = (x @ attn.c_attn.weight.detach().T).split(C, dim=-1)
    y = torch.zeros(B, T, C)
    for b in range(B):
        for h in range(H):
            heads = slice(h * D, (h + 1) * D)
            # each head's query and key rows scaled to unit root-mean-square
            qh = q[b, :, heads] / (q[b, :, heads].pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
            kh = k[b, :, heads] / (k[b, :, heads].pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
            for t in range(T):
                scores = torch.tensor([qh[t] @ kh[s] / math.sqrt(D) for s in range(t + 1)])
                y[b, t, heads] = scores.softmax(0) @ v[b, :t + 1, heads]
    with torch.no_grad():
        assert torch.allclose(attn(x), y @ attn.c_proj.weight.detach().T, atol=1e-5)


def test_logit_softcap_by_hand():
    capped, plain = lively_model(logit_softcap=2.0), lively_model()
    plain.load_state_dict(capped.state_dict())
    idx = random_ids(2, 9)
    with torch.no_grad():
        raw, capped_logits = plain(idx)[0], capped(idx)[0]
    assert raw.abs().max() > 2.0  # the cap is reached
    assert torch.allclose(capped_logits, 2.0 * torch.tanh(raw / 2.0), atol=1e-6)
    assert capped_logits.abs().max() < 2.0


def test_zero_init_projections_start_each_block_as_the_identity():
    model = tiny_model(zero_init_proj=True)
    zeroed = [name for name, p in model.named_parameters() if p.dim() == 2 and not p.any()]
    assert zeroed == [f"h.{i}.{part}.c_proj.weight" for i in range(2) for part in ("attn", "mlp")]
    idx = random_ids(2, 9)
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(9))
        assert torch.allclose(model.hidden_states(idx), model.ln_f(x), atol=1e-6)
