"""
Tests for generation (model.py's KV cache, Decoder, generate_stream and sample_next)
and sample.py's command line: the cache and the Decoder's one-token step against the
modules' full recompute, generation in both windowing modes against plain loops
written here, sampling's filters (temperature, top-k, top-p) against their
definitions, and the cache on a GPU.

The equivalence tests run in float64. A cached step and a full recompute add the
same terms in another order; in float32 that moves a logit by about 1e-6, enough
to flip a near-tie on another CPU; in float64 by about 1e-15, which no tie this
tiny comes near. Every model is tiny (2-3 layers, width 32, context 16-32):
seconds on one thread.
"""

import dataclasses

import pytest
import torch

import sample
from cli import UserError
from conftest import (CACHE_VARIANTS, VARIANT_PARAMS, VARIANTS, VOCAB, lively_model, random_ids, tiny_config,
                      tiny_model)
from model import Decoder, KVCache, sample_next, save_checkpoint

# float64 rounds at 1e-16 relative; through two layers of 32-wide sums the two ways of computing a
# hidden state of order 1 differ by about 1e-15, and a wrong cache entry moves it by 1e-2 or more
F64_ATOL = 1e-12


def lively_f64(**overrides):
    return lively_model(**overrides).double()


# ----------------------------------------------------------------------------
# 1. the KV cache gives what a full recompute gives

@pytest.mark.exercise(7)
@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_cache_in_pieces_matches_full_forward(variant):
    model = tiny_model(**variant).double()
    T = 12
    idx = random_ids(2, T)
    cache = KVCache(model.config, 2, "cpu", torch.float64)
    with torch.no_grad():
        full_states = model.hidden_states(idx)
        full_logits = model(idx)[0]
        # a prefix of 5, a chunk of 3 (the offset-mask path), then single tokens
        pieces = [model.hidden_states(idx[:, :5], cache), model.hidden_states(idx[:, 5:8], cache)]
        assert cache.length == 8
        pieces += [model.hidden_states(idx[:, t:t + 1], cache) for t in range(8, T)]
    assert cache.length == T
    states = torch.cat(pieces, dim=1)
    torch.testing.assert_close(states, full_states, atol=F64_ATOL, rtol=0)
    torch.testing.assert_close(model.head(states), full_logits, atol=F64_ATOL, rtol=0)


CPU_TINY_LIKE = dict(ffn="relu2", qk_norm=True, norm="rmsnorm", pos="rope")
# the shared variants, cpu-tiny's recipe, the FFNs they leave out (the Decoder writes out FFN's own
# computation and calls the others' modules), and an untied head with dropout (off in inference)
DECODER_VARIANTS = (VARIANT_PARAMS + [pytest.param(CPU_TINY_LIKE, id="cpu-tiny-like")]
                    + [pytest.param(dict(ffn=f), id=f)
                       for f in ("linear", "gelu_linear", "rep_linear", "rep_parallel", "rep_anneal")]
                    + [pytest.param(dict(tie_embeddings=False, dropout=0.1), id="untied-dropout")])


@pytest.mark.exercise(7)
@pytest.mark.parametrize("variant", DECODER_VARIANTS)
def test_decoder_steps_equal_the_modules(variant):
    """The Decoder's one-token step gives the modules' logits and writes the same cache."""
    model = lively_f64(**variant)
    idx = random_ids(2, 12)
    by_modules, by_decoder = (KVCache(model.config, 2, "cpu", torch.float64) for _ in range(2))
    decoder = Decoder(model)
    with torch.no_grad():
        for cache in (by_modules, by_decoder):
            model.hidden_states(idx[:, :5], cache)
        for t in range(5, 12):
            expected = model.head(model.hidden_states(idx[:, t:t + 1], by_modules)[:, -1])
            torch.testing.assert_close(decoder(idx[:, t:t + 1], by_decoder), expected, atol=F64_ATOL, rtol=0)
    assert by_decoder.length == by_modules.length == 12
    torch.testing.assert_close(by_decoder.k, by_modules.k, atol=F64_ATOL, rtol=0)
    torch.testing.assert_close(by_decoder.v, by_modules.v, atol=F64_ATOL, rtol=0)


def test_the_decoder_refuses_a_full_cache():
    model = tiny_model(block_size=8)
    cache = KVCache(model.config, 1, "cpu", torch.float32)
    with torch.no_grad():
        model.hidden_states(random_ids(1, 8), cache)
        with pytest.raises(ValueError, match="exceeds block_size 8"):
            Decoder(model)(random_ids(1, 1), cache)


@pytest.mark.exercise(7)
def test_cache_slots_and_heads():
    config = tiny_config(n_layer=3, block_repeat=2, n_head=4, n_kv_head=2, block_size=16)
    cache = KVCache(config, 5, "cpu", torch.float32)
    # one slot per block application; grouped-query attention stores only the kv heads
    assert cache.k.shape == (3 * 2, 5, 2, 16, 32 // 4)
    assert cache.v.shape == cache.k.shape
    assert cache.length == 0


@pytest.mark.exercise(7)
def test_store_writes_after_the_stored_positions_and_returns_them_all():
    config = tiny_config(n_layer=2, n_head=4, n_kv_head=2, block_size=8)  # head_dim 8
    cache = KVCache(config, 3, "cpu", torch.float64)
    assert cache.k.dtype == cache.v.dtype == torch.float64 and not cache.k.any() and not cache.v.any()
    storage = cache.k.data_ptr(), cache.v.data_ptr()
    k1, v1 = torch.randn(3, 2, 5, 8, dtype=torch.float64), torch.randn(3, 2, 5, 8, dtype=torch.float64)
    k, v = cache.store(1, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    assert cache.length == 0  # the model advances it, once every slot has stored
    assert not cache.k[0].any() and not cache.k[1, :, :, 5:].any()  # nothing written elsewhere
    cache.length = 5
    k2, v2 = torch.randn(3, 2, 2, 8, dtype=torch.float64), torch.randn(3, 2, 2, 8, dtype=torch.float64)
    k, v = cache.store(1, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == storage  # preallocated: written in place, never regrown


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
    model = lively_f64(block_size=16, **variant)
    prompt = random_ids(2, 5)
    # 60 new tokens: the 16-token window fills and is refilled several times
    out = model.generate(prompt, 60, temperature=0, use_cache=True)
    assert out.shape == (2, 65) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, half_window_reference(model, prompt, 60, temperature=0))


@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_uncached_generation_is_nanogpts_sliding_window(variant):
    model = lively_f64(block_size=16, **variant)
    prompt = random_ids(2, 5)
    out = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(out, sliding_window_reference(model, prompt, 40))


@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_greedy_generation_within_context_equals_plain_loop(variant):
    model = lively_f64(block_size=16, **variant)
    prompt = random_ids(2, 4)
    with torch.no_grad():
        expected = greedy_reference(model, prompt, 12)  # 16 tokens in all: never past the context
    for use_cache in (True, False):
        assert torch.equal(model.generate(prompt, 12, temperature=0, use_cache=use_cache), expected)


def test_generation_from_a_prompt_longer_than_the_context():
    model = lively_f64(block_size=16)
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
    model = lively_f64(block_size=16, **variant)
    prompt = random_ids(2, 3)
    sampling = dict(temperature=1.0, top_k=50, top_p=0.95)
    out = model.generate(prompt, 40, generator=torch.Generator().manual_seed(1234), **sampling)
    expected = half_window_reference(model, prompt, 40, generator=torch.Generator().manual_seed(1234), **sampling)
    assert torch.equal(out, expected)
    other = model.generate(prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(other, out)  # the seed matters: it really samples


def test_generate_stream_streams(monkeypatch):
    """Each token is yielded as soon as it is sampled: taking k tokens runs k decode steps, not all of them."""
    model = lively_f64(block_size=16)
    prompt = random_ids(3, 4)
    # every step, the prompt's and each new token's, writes the cache of each layer once
    stores = []
    store = KVCache.store
    monkeypatch.setattr(KVCache, "store", lambda cache, *args: stores.append(1) or store(cache, *args))
    stream = model.generate_stream(prompt, 1000, temperature=0)
    first = [next(stream) for _ in range(3)]
    assert len(stores) == 3 * model.config.n_layer and all(t.shape == (3, 1) for t in first)
    assert torch.equal(torch.cat([prompt, *first], dim=1), greedy_reference(model, prompt, 3))


# ----------------------------------------------------------------------------
# 2. sample_next

@pytest.mark.exercise(15)
def test_temperature_zero_is_argmax():
    logits = torch.randn(16, VOCAB)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(dim=-1, keepdim=True))
    assert sample_next(logits, temperature=0).shape == (16, 1)


@pytest.mark.exercise(15)
def test_top_k_one_is_argmax():
    logits = torch.randn(4, VOCAB).repeat(250, 1)  # 1000 draws
    draws = sample_next(logits, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, logits.argmax(dim=-1, keepdim=True))


@pytest.mark.exercise(15)
def test_top_k_keeps_only_the_k_best():
    logits = torch.randn(1, VOCAB)
    best = set(torch.topk(logits, 5).indices[0].tolist())
    draws = sample_next(logits.repeat(2000, 1), top_k=5, generator=torch.Generator().manual_seed(0))
    assert set(draws.flatten().tolist()) == best


@pytest.mark.exercise(15)
@pytest.mark.parametrize("top_p, allowed", [(0.4, {0}), (0.6, {0, 1}), (0.75, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, allowed):
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().repeat(4000, 1)
    draws = sample_next(logits, top_p=top_p, generator=torch.Generator().manual_seed(0)).flatten()
    assert set(draws.tolist()) == allowed
    # the kept tokens are renormalised, not reweighted: over 4,000 draws a frequency has a standard
    # deviation of at most sqrt(0.25 / 4000) = 0.008, so 0.03 is nearly 4 of them
    kept = probs[sorted(allowed)] / probs[sorted(allowed)].sum()
    freq = torch.bincount(draws, minlength=3)[sorted(allowed)].float() / len(draws)
    torch.testing.assert_close(freq, kept, atol=0.03, rtol=0)


@pytest.mark.exercise(15)
@pytest.mark.parametrize("top_p, n_kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4)])
def test_top_p_stops_as_soon_as_the_mass_is_reached(top_p, n_kept):
    # four equal logits: probabilities of exactly 1/4, so the running mass hits top_p exactly
    draws = sample_next(torch.zeros(2000, 4), top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert len(set(draws.flatten().tolist())) == n_kept


@pytest.mark.exercise(15)
def test_top_p_zero_keeps_the_likeliest_token():
    logits = torch.randn(8, VOCAB)
    draws = sample_next(logits, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, logits.argmax(dim=-1, keepdim=True))


@pytest.mark.exercise(15)
def test_top_p_is_per_row_and_order_independent():
    # the same distribution, permuted: the nucleus follows the tokens
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]).log().repeat(1000, 1)
    draws = sample_next(logits, top_p=0.6, generator=torch.Generator().manual_seed(0)).view(1000, 2)
    assert set(draws[:, 0].tolist()) == {0, 1}
    assert set(draws[:, 1].tolist()) == {1, 2}


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=2.0), dict(temperature=0.3), dict(top_k=5),
                                      dict(top_k=50), dict(top_p=0.99), dict(top_k=4, top_p=0.9, temperature=5.0)],
                         ids=str)
@pytest.mark.exercise(15)
def test_masked_tokens_are_never_sampled(sampling):
    logits = torch.randn(1, VOCAB).repeat(3000, 1)
    banned = torch.arange(VOCAB) % 3 != 0  # only every third token is allowed
    logits[:, banned] = float("-inf")
    draws = sample_next(logits, generator=torch.Generator().manual_seed(0), **sampling)
    assert not banned[draws.flatten()].any()


@pytest.mark.exercise(15)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_sharpens_or_flattens(temperature):
    probs = torch.tensor([0.5, 0.3, 0.2])
    draws = sample_next(probs.log().repeat(4000, 1), temperature=temperature,
                        generator=torch.Generator().manual_seed(0)).flatten()
    expected = probs ** (1 / temperature)  # softmax(log p / T) is proportional to p^(1/T)
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    # 4,000 draws: a standard deviation of at most 0.008 per frequency, so 0.03 is nearly 4 of them
    torch.testing.assert_close(freq, expected / expected.sum(), atol=0.03, rtol=0)


def test_a_draw_is_torch_multinomials_draw():
    # the exponential race is how torch.multinomial draws one sample: from the same generator, sample_next
    # draws the very same tokens (compared exactly: the same exponentials, divisions and argmax)
    logits = 3 * torch.randn(64, 300)
    for seed in range(3):
        probs = (logits / 0.8).softmax(dim=-1)
        expected = torch.multinomial(probs, num_samples=1, generator=torch.Generator().manual_seed(seed))
        draws = sample_next(logits, temperature=0.8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(draws, expected)


@pytest.mark.exercise(15)
def test_temperature_comes_first_and_top_k_and_top_p_filter_the_tempered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    # 8,000 draws: a frequency's standard deviation is at most sqrt(0.25 / 8000) = 0.0056, so 0.025 is 4.5 of them
    n, atol = 8000, 0.025

    def frequencies(**sampling):
        draws = sample_next(probs.log().repeat(n, 1), generator=torch.Generator().manual_seed(0), **sampling)
        return torch.bincount(draws.flatten(), minlength=3).float() / n

    # T = 2: proportional to sqrt(p), 0.415, 0.322, 0.263. Their first token holds less than 0.45, so top_p = 0.45
    # keeps two (of the untempered ones it would keep one), renormalised
    tempered = probs.sqrt() / probs.sqrt().sum()
    freq = frequencies(temperature=2.0, top_p=0.45)
    assert freq[2] == 0
    torch.testing.assert_close(freq[:2], tempered[:2] / tempered[:2].sum(), atol=atol, rtol=0)
    # T = 0.5: proportional to p^2, 0.25, 0.09, 0.04; top_k = 2 keeps the first two, renormalised: 0.735, 0.265
    freq = frequencies(temperature=0.5, top_k=2)
    assert freq[2] == 0
    torch.testing.assert_close(freq[:2], torch.tensor([0.25, 0.09]) / 0.34, atol=atol, rtol=0)


@pytest.mark.exercise(15)
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
    # float64 on both devices: other kernels sum in other orders, and only float64 keeps that at 1e-15
    cpu_model = lively_f64(block_size=16, **variant)
    gpu_model = lively_f64(block_size=16, **variant).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    idx = random_ids(2, 12)
    with torch.no_grad():
        cpu_logits = cpu_model(idx)[0]
        gpu_logits = gpu_model(idx.cuda())[0]
        cache = KVCache(gpu_model.config, 2, "cuda", torch.float64)
        pieces = [gpu_model.hidden_states(idx[:, :5].cuda(), cache)]
        pieces += [gpu_model.hidden_states(idx[:, t:t + 1].cuda(), cache) for t in range(5, 12)]
        cached_logits = gpu_model.head(torch.cat(pieces, dim=1))
    # logits of order 10 round at about 1e-15 in float64: 1e-10 is far above that, far below an error
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cached_logits, gpu_logits, atol=1e-10, rtol=1e-10)
    prompt = random_ids(2, 5).cuda()
    assert torch.equal(gpu_model.generate(prompt, 40, temperature=0),
                       half_window_reference(gpu_model, prompt, 40, temperature=0))


# ----------------------------------------------------------------------------
# 4. sample.py at the edges: no new tokens, a prompt longer than the context

@pytest.fixture
def byte_checkpoint(tmp_path):
    """A lively byte-level model with a context of 16, saved as train.py saves one."""
    model = lively_model(block_size=16, vocab_size=256)
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "data_meta": {"tokenization": "bytes", "vocab_size": 256}}, path)
    return path


def sample_output(capsys, ckpt, *args):
    """(stdout, stderr) of sample.py's command line, greedy, on one thread."""
    capsys.readouterr()
    sample.main([f"--ckpt={ckpt}", "--temperature=0", "--threads=1", *args])
    return capsys.readouterr()


def test_sample_with_no_new_tokens_prints_the_prompt_alone(byte_checkpoint, capsys):
    out, err = sample_output(capsys, byte_checkpoint, "--prompt=to be", "--max_new_tokens=0", "--num_samples=2")
    assert out == "to be\n" * 2
    assert err.count("--- 0 tokens in") == 2 and "tokens/s" not in err


@pytest.mark.parametrize("use_cache", ["true", "false"])
def test_sample_continues_a_long_prompt_from_its_last_block_size_tokens(byte_checkpoint, capsys, use_cache):
    prompt = "It was the best of times, it was the worst of times."  # 52 bytes, for a context of 16
    args = ["--max_new_tokens=20", f"--use_cache={use_cache}"]
    out, err = sample_output(capsys, byte_checkpoint, f"--prompt={prompt}", *args)
    assert out.startswith(prompt)
    assert "note: the prompt is 52 tokens and the model reads 16: it continues from the prompt's last 16" in err
    # the same continuation as from those 16 bytes alone (the same computation: equal to the bit) ...
    tail, tail_err = sample_output(capsys, byte_checkpoint, f"--prompt={prompt[-16:]}", *args)
    assert out[len(prompt):] == tail[16:] and "note" not in tail_err
    # ... and not the one from any other 16: the tail is what the model reads
    head, _ = sample_output(capsys, byte_checkpoint, f"--prompt={prompt[:16]}", *args)
    assert head[16:] != tail[16:]


def test_sample_refuses_a_checkpoint_that_names_no_tokenization(tmp_path):
    model = tiny_model(vocab_size=256)
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)},
                    tmp_path / "bare.pt")
    with pytest.raises(UserError, match="does not say how its text was tokenized") as info:
        sample.main([f"--ckpt={tmp_path / 'bare.pt'}", "--threads=1"])
    assert "\n" not in str(info.value)
