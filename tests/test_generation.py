"""
Tests for generation.py: the KV cache against full recompute, generation in
both windowing modes against plain loops written here, sampling's filters
(temperature, top-k, top-p) against their definitions, and the cache on a GPU.

Every model is tiny (2-3 layers, width 32, context 16-32): seconds on one thread.
"""

import pytest
import torch

from conftest import CACHE_VARIANTS, VARIANTS, VOCAB, lively_model, random_ids, tiny_config, tiny_model
from generation import KVCache, sample_next


# ----------------------------------------------------------------------------
# 1. the KV cache gives what a full recompute gives

@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_cache_in_pieces_matches_full_forward(variant):
    model = tiny_model(**variant)
    T = 12
    idx = random_ids(2, T)
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        full_states = model.hidden_states(idx)
        full_logits = model(idx)[0]
        # a prefix of 5, a chunk of 3 (the offset-mask path), then single tokens
        pieces = [model.hidden_states(idx[:, :5], cache), model.hidden_states(idx[:, 5:8], cache)]
        assert cache.length == 8
        pieces += [model.hidden_states(idx[:, t:t + 1], cache) for t in range(8, T)]
    assert cache.length == T
    states = torch.cat(pieces, dim=1)
    torch.testing.assert_close(states, full_states, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.head(states), full_logits, atol=1e-5, rtol=0)


def test_cache_slots_and_heads():
    config = tiny_config(n_layer=3, block_repeat=2, n_head=4, n_kv_head=2, block_size=16)
    cache = KVCache(config, 5, "cpu", torch.float32)
    # one slot per block application; grouped-query attention stores only the kv heads
    assert cache.k.shape == (3 * 2, 5, 2, 16, 32 // 4)
    assert cache.v.shape == cache.k.shape
    assert cache.length == 0


def greedy_reference(model, idx, steps):
    """Greedy decoding the plain way: the whole prefix through model(idx) at every step."""
    for _ in range(steps):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def half_window_reference(model, idx, steps, **sampling):
    """
    What generate_stream(use_cache=True) documents, computed the slow way: the
    whole window through model(window) at every step, and once the window
    outgrows block_size it restarts from its newest half.
    """
    block_size = model.config.block_size
    window, new = idx[:, -block_size:], []
    with torch.no_grad():
        for _ in range(steps):
            token = sample_next(model(window)[0][:, -1], **sampling)
            new.append(token)
            window = torch.cat([window, token], dim=1)
            if window.size(1) > block_size:
                window = window[:, -(block_size - block_size // 2):]
    return torch.cat([idx, *new], dim=1)


def sliding_window_reference(model, idx, steps):
    """nanoGPT's sample loop: greedy, the last block_size tokens recomputed at every step."""
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_cached_generation_equals_the_half_window_reference(variant):
    model = lively_model(block_size=16, **variant)
    prompt = random_ids(2, 5)
    # 60 new tokens: the 16-token window fills and is refilled several times
    out = model.generate(prompt, 60, temperature=0, use_cache=True)
    assert out.shape == (2, 65) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, half_window_reference(model, prompt, 60, temperature=0))


@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_uncached_generation_is_nanogpts_sliding_window(variant):
    model = lively_model(block_size=16, **variant)
    prompt = random_ids(2, 5)
    out = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(out, sliding_window_reference(model, prompt, 40))


@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_greedy_generation_within_context_equals_plain_loop(variant):
    model = lively_model(block_size=16, **variant)
    prompt = random_ids(2, 4)
    with torch.no_grad():
        expected = greedy_reference(model, prompt, 12)  # 16 tokens in all: never past the context
    for use_cache in (True, False):
        assert torch.equal(model.generate(prompt, 12, temperature=0, use_cache=use_cache), expected)


def test_generation_from_a_prompt_longer_than_the_context():
    model = lively_model(block_size=16)
    prompt = random_ids(1, 40)
    for use_cache in (True, False):
        out = model.generate(prompt, 20, temperature=0, use_cache=use_cache)
        assert torch.equal(out[:, :40], prompt)
        # the first new token conditions on the last block_size tokens of the prompt
        with torch.no_grad():
            first = model(prompt[:, -16:])[0][:, -1].argmax(dim=-1)
        assert out[0, 40] == first[0]
    assert torch.equal(model.generate(prompt, 20, temperature=0), half_window_reference(model, prompt, 20, temperature=0))


@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_sampled_generation_with_cache_equals_the_reference(variant):
    model = lively_model(block_size=16, **variant)
    prompt = random_ids(2, 3)
    sampling = dict(temperature=1.0, top_k=50, top_p=0.95)
    out = model.generate(prompt, 40, generator=torch.Generator().manual_seed(1234), **sampling)
    expected = half_window_reference(model, prompt, 40, generator=torch.Generator().manual_seed(1234), **sampling)
    assert torch.equal(out, expected)
    other = model.generate(prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(other, out)  # the seed matters: it really samples


def test_generate_stream_streams():
    """Each token is yielded as soon as it is sampled: taking k tokens runs k decode steps, not all of them."""
    model = lively_model(block_size=16)
    prompt = random_ids(3, 4)
    calls = []
    handle = model.ln_f.register_forward_hook(lambda *args: calls.append(1))
    stream = model.generate_stream(prompt, 1000, temperature=0)
    first = [next(stream) for _ in range(3)]
    handle.remove()
    assert len(calls) == 3 and all(t.shape == (3, 1) for t in first)
    assert torch.equal(torch.cat([prompt, *first], dim=1), greedy_reference(model, prompt, 3))


# ----------------------------------------------------------------------------
# 2. sample_next

def test_temperature_zero_is_argmax():
    logits = torch.randn(16, VOCAB)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(dim=-1, keepdim=True))
    assert sample_next(logits, temperature=0).shape == (16, 1)


def test_top_k_one_is_argmax():
    logits = torch.randn(4, VOCAB).repeat(250, 1)  # 1000 draws
    draws = sample_next(logits, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, logits.argmax(dim=-1, keepdim=True))


def test_top_k_keeps_only_the_k_best():
    logits = torch.randn(1, VOCAB)
    best = set(torch.topk(logits, 5).indices[0].tolist())
    draws = sample_next(logits.repeat(2000, 1), top_k=5, generator=torch.Generator().manual_seed(0))
    assert set(draws.flatten().tolist()) == best


@pytest.mark.parametrize("top_p, allowed", [(0.4, {0}), (0.6, {0, 1}), (0.75, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, allowed):
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().repeat(4000, 1)
    draws = sample_next(logits, top_p=top_p, generator=torch.Generator().manual_seed(0)).flatten()
    assert set(draws.tolist()) == allowed
    # the kept tokens are renormalised, not reweighted
    kept = probs[sorted(allowed)] / probs[sorted(allowed)].sum()
    freq = torch.bincount(draws, minlength=3)[sorted(allowed)].float() / len(draws)
    torch.testing.assert_close(freq, kept, atol=0.03, rtol=0)


@pytest.mark.parametrize("top_p, n_kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4)])
def test_top_p_stops_as_soon_as_the_mass_is_reached(top_p, n_kept):
    # four equal logits: probabilities of exactly 1/4, so the running mass hits top_p exactly
    draws = sample_next(torch.zeros(2000, 4), top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert len(set(draws.flatten().tolist())) == n_kept


def test_top_p_zero_keeps_the_likeliest_token():
    logits = torch.randn(8, VOCAB)
    draws = sample_next(logits, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, logits.argmax(dim=-1, keepdim=True))


def test_top_p_is_per_row_and_order_independent():
    # the same distribution, permuted: the nucleus follows the tokens
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]).log().repeat(1000, 1)
    draws = sample_next(logits, top_p=0.6, generator=torch.Generator().manual_seed(0)).view(1000, 2)
    assert set(draws[:, 0].tolist()) == {0, 1}
    assert set(draws[:, 1].tolist()) == {1, 2}


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=2.0), dict(temperature=0.3), dict(top_k=5),
                                      dict(top_k=50), dict(top_p=0.99), dict(top_k=4, top_p=0.9, temperature=5.0)],
                         ids=str)
def test_masked_tokens_are_never_sampled(sampling):
    logits = torch.randn(1, VOCAB).repeat(3000, 1)
    banned = torch.arange(VOCAB) % 3 != 0  # only every third token is allowed
    logits[:, banned] = float("-inf")
    draws = sample_next(logits, generator=torch.Generator().manual_seed(0), **sampling)
    assert not banned[draws.flatten()].any()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_sharpens_or_flattens(temperature):
    probs = torch.tensor([0.5, 0.3, 0.2])
    draws = sample_next(probs.log().repeat(4000, 1), temperature=temperature,
                        generator=torch.Generator().manual_seed(0)).flatten()
    expected = probs ** (1 / temperature)  # softmax(log p / T) is proportional to p^(1/T)
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(freq, expected / expected.sum(), atol=0.03, rtol=0)


def test_sampling_is_reproducible_with_a_generator():
    logits = torch.randn(64, VOCAB)
    a = sample_next(logits, top_k=20, generator=torch.Generator().manual_seed(5))
    b = sample_next(logits, top_k=20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------
# 3. the same model and its cache on a GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("variant", [pytest.param(VARIANTS[k], id=k) for k in ("learned-gelu-layernorm", "stlm-like")])
def test_cuda_matches_cpu_and_its_cache_matches_full_forward(variant):
    cpu_model = lively_model(block_size=16, **variant)
    gpu_model = lively_model(block_size=16, **variant).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    idx = random_ids(2, 12)
    with torch.no_grad():
        cpu_logits = cpu_model(idx)[0]
        gpu_logits = gpu_model(idx.cuda())[0]
        cache = KVCache(gpu_model.config, 2, "cuda", torch.float32)
        pieces = [gpu_model.hidden_states(idx[:, :5].cuda(), cache)]
        pieces += [gpu_model.hidden_states(idx[:, t:t + 1].cuda(), cache) for t in range(5, 12)]
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu_model.lm_head(torch.cat(pieces, dim=1)), gpu_logits, atol=1e-4, rtol=1e-4)
    prompt = random_ids(2, 5).cuda()
    assert torch.equal(gpu_model.generate(prompt, 40, temperature=0),
                       half_window_reference(gpu_model, prompt, 40, temperature=0))
