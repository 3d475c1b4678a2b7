"""
byte_tokenizer.py: chunk ends from the past only, the flat pooled model against a loop reference, exact
probabilities, the KV cache, parameter counts, and a pooled model end to end.

Equivalences are checked in float64: the batched model and its references add the same terms in other
orders (rows padded to another length sum in another order), which float64 keeps near 1e-15 of a logit;
a prediction that saw a later byte, or a wrong chunk end, moves it by 1e-2 or more.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import byte_tokenizer as bt
import tokenizer as tk
import train
from cli import UserError
from data import prepare
from model import GPT, GPTConfig, load_checkpoint, model_from_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FOUND_BOUNDARIES = ("space", "fixed")  # found from the bytes; gpt2's ends are markers in the data
F64_ATOL = 1e-9


# the pooled model without and with hashed n-grams
INGREDIENTS = {"plain": dict(ngram_buckets=0), "ngram": dict(ngram_buckets=31)}
INGREDIENT_PARAMS = [pytest.param(v, id=k) for k, v in INGREDIENTS.items()]


def small_model(boundary="space", block_size=24, window=6, dtype=torch.float64, **ingredients):
    torch.manual_seed(0)
    vocab_size = tk.BYTES_GPT2_VOCAB if boundary == "gpt2" else tk.BYTE_VOCAB
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size,
                       embedder="pooled", boundary=boundary, byte_width=16, byte_window=window, qk_norm=True,
                       ffn="relu2", **ingredients)
    model = GPT(config).to(dtype).eval()
    with torch.no_grad():  # larger weights than the initialisation's, so every path moves the logits
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def spacey_bytes(rng, shape):
    """Random bytes, a third of them spaces or punctuation, so chunk ends are many and irregular."""
    letters = rng.integers(ord("a"), ord("z") + 1, size=shape)
    spaces = rng.choice(np.frombuffer(b" .,\n", dtype=np.uint8), size=shape)
    other = rng.integers(0, 256, size=shape)
    pick = rng.random(shape)
    return torch.from_numpy(np.where(pick < 0.35, spaces, np.where(pick < 0.9, letters, other)).astype(np.int64))


def boundary_ids(rng, shape, boundary):
    """Input for a model under `boundary`: spacey bytes, and under gpt2 end markers in a fifth of the places."""
    idx = spacey_bytes(rng, shape)
    if boundary == "gpt2":
        idx[torch.from_numpy(rng.random(shape) < 0.2)] = tk.GPT2_TOKEN_END
    return idx


# ----------------------------------------------------------------------------
# chunk ends

@pytest.mark.exercise(4)
@pytest.mark.parametrize("boundary", FOUND_BOUNDARIES)
def test_chunk_ends_follow_the_rule_as_a_loop_states_it_and_never_look_ahead(boundary):
    rng = np.random.default_rng(0)
    idx = spacey_bytes(rng, (20, 40))
    idx[0, :30] = ord("a")  # a long word: the space rule must cut it at max_chunk_bytes
    ends = bt.chunk_ends(idx, boundary, max_chunk_bytes=5, fixed_chunk_bytes=3)
    for row, row_ends in zip(idx, ends):
        assert row_ends.tolist() == loop_chunk_ends(row.tolist(), boundary, 5, 3)
    for t in range(1, 40):  # the rule never looks ahead: a prefix gets the same ends
        assert torch.equal(bt.chunk_ends(idx[:, :t], boundary, 5, 3), ends[:, :t])


@pytest.mark.exercise(4)
def test_is_spacelike_over_every_byte():
    every = torch.arange(256)
    # not an ASCII letter or digit, and not a UTF-8 continuation byte (0b10xxxxxx)
    expected = [not (chr(b).isascii() and chr(b).isalnum()) and not 0x80 <= b < 0xC0 for b in range(256)]
    assert bt.is_spacelike(every).tolist() == expected
    assert bt.is_spacelike(every.view(16, 16)).tolist() == torch.tensor(expected).view(16, 16).tolist()


@pytest.mark.exercise(4)
def test_chunk_ends_by_hand():
    def last_bytes(text, boundary, **sizes):
        return torch.nonzero(bt.chunk_ends(torch.tensor([list(text)]), boundary, **sizes)[0]).flatten().tolist()
    # a chunk closes at a spacelike byte that follows a non-spacelike one: "Hi," " there " " you!" "\nok"
    assert last_bytes(b"Hi, there  you!\nok", "space") == [2, 9, 14]
    assert last_bytes(b"Hi, there  you!\nok", "fixed", fixed_chunk_bytes=4) == [3, 7, 11, 15]
    assert last_bytes(b"a" * 20, "space", max_chunk_bytes=8) == [7, 15]  # cut, never truncated
    # a UTF-8 lead byte is spacelike, its continuation bytes are not: "é x" ends at 0xC3 and at the space
    assert last_bytes("é x".encode(), "space") == [0, 2]


@pytest.mark.exercise(4)
def test_gpt2_ends_are_markers_in_bytes_gpt2_data_at_gpt2s_cuts(gpt2):
    text = "Hello there, naïve café 東京 🙂!\n  theirs"
    ids = tk.mark_gpt2_token_ends(text.encode("utf-8") + b"\xff\xfe tail")  # invalid UTF-8 too
    assert bytes(ids[ids != tk.GPT2_TOKEN_END].astype(np.uint8)) == text.encode("utf-8") + b"\xff\xfe tail"
    table = tk.token_byte_table("bytes_gpt2")
    assert table[tk.GPT2_TOKEN_END] == b"" and ids[-1] == tk.GPT2_TOKEN_END
    chunks = [bytes(c.astype(np.uint8)) for c in np.split(ids, np.flatnonzero(ids == tk.GPT2_TOKEN_END) + 1)[:-1]]
    tokens = [gpt2.decode_single_token_bytes(t) for t in gpt2.encode_ordinary(text)]
    # each chunk is a GPT-2 token's bytes then its marker; each invalid byte is a chunk of its own
    assert [c[:-1] for c in chunks] == tokens + [b"\xff", b"\xfe"] + [gpt2.decode_single_token_bytes(t)
                                                                      for t in gpt2.encode_ordinary(" tail")]
    ends = bt.chunk_ends(torch.from_numpy(ids.astype(np.int64))[None], "gpt2")[0]
    assert torch.equal(ends, torch.from_numpy(ids == tk.GPT2_TOKEN_END))


def test_each_boundary_reads_its_own_data():
    with pytest.raises(UserError, match="--tokenization=bytes_gpt2"):
        GPTConfig(embedder="pooled", boundary="gpt2").validate()
    GPTConfig(embedder="pooled", boundary="gpt2", vocab_size=tk.BYTES_GPT2_VOCAB).validate()
    with pytest.raises(UserError, match="bytes_gpt2 data pools with --boundary=gpt2"):
        GPTConfig(embedder="pooled", boundary="space", vocab_size=tk.BYTES_GPT2_VOCAB).validate()
    with pytest.raises(UserError, match="--boundary=words is not one of space, fixed, gpt2"):
        GPTConfig(embedder="pooled", boundary="words").validate()
    with pytest.raises(UserError, match="reads bytes"):
        GPTConfig(embedder="pooled", vocab_size=50257).validate()


# ----------------------------------------------------------------------------
# the model: causal, exact, and what a plain loop computes

@pytest.mark.parametrize("ingredients", INGREDIENT_PARAMS)
@pytest.mark.parametrize("boundary", bt.BOUNDARIES)
def test_no_byte_prediction_sees_a_later_byte(boundary, ingredients):
    model = small_model(boundary, **ingredients)
    rng = np.random.default_rng(1)
    idx = boundary_ids(rng, (3, 24), boundary)
    an_end = tk.GPT2_TOKEN_END if boundary == "gpt2" else ord(" ")
    with torch.no_grad():
        reference = model(idx)[0]
        for t in range(0, 23, 2):
            changed = idx.clone()
            changed[:, t + 1:] = boundary_ids(rng, (3, 23 - t), boundary)  # byte t + 1 and everything after it
            ended = bt.chunk_ends(idx, boundary, 5, 3)[:, t + 1]
            changed[:, t + 1] = torch.where(ended, ord("x"), an_end)  # a chunk end moves (not under fixed)
            logits = model(changed)[0]
            torch.testing.assert_close(logits[:, :t + 1], reference[:, :t + 1], rtol=0, atol=F64_ATOL)
            assert not torch.allclose(logits[:, t + 1:], reference[:, t + 1:])  # the test can see a change


@pytest.mark.parametrize("first", [b"a", b" "], ids=["letter", "space"])
def test_probabilities_of_every_two_byte_continuation_sum_to_one(first):
    # chain rule over all 256^2 strings after one byte, in float64: with "a" first, a spacelike second byte
    # ends a chunk and the core's output reaches the third; with " " first, the core runs at byte 0
    model = small_model("space")
    pairs = torch.cartesian_prod(torch.arange(256), torch.arange(256))
    idx = torch.cat([torch.full((len(pairs), 1), first[0]), pairs], dim=1)
    with torch.no_grad():
        log_p = model(idx[:, :-1])[0].log_softmax(-1)
    per_string = log_p.gather(-1, idx[:, 1:, None]).sum(dim=(1, 2))
    assert per_string.logsumexp(0).item() == pytest.approx(0.0, abs=1e-9)
    assert bt.chunk_ends(idx[:, :-1], "space").any()  # the core ran inside these probabilities


def loop_chunk_ends(row, boundary, max_chunk_bytes=bt.MAX_CHUNK_BYTES, fixed_chunk_bytes=bt.FIXED_CHUNK_BYTES):
    """The rule as a person states it, one byte at a time, with a counter."""
    ends, length = [], 0
    for t, byte in enumerate(row):
        length += 1
        if boundary == "gpt2":
            end = byte == tk.GPT2_TOKEN_END
        elif boundary == "fixed":
            end = (t + 1) % fixed_chunk_bytes == 0
        else:
            spacelike = not (chr(byte).isascii() and chr(byte).isalnum()) and not 0x80 <= byte < 0xC0
            before = row[t - 1] if t else None
            before_spacelike = before is not None and not (chr(before).isascii() and chr(before).isalnum()) \
                and not 0x80 <= before < 0xC0
            end = (spacelike and not before_spacelike) or length == max_chunk_bytes
        ends.append(end)
        length = 0 if end else length
    return ends


def loop_block(block, x, window):
    """A ByteBlock on one row (T, width), attention written as a loop over each byte's window."""
    T, C = x.shape
    H = block.n_head
    q, k, v = block.qkv(block.ln_1(x)).view(T, 3, H, C // H).unbind(1)
    out = torch.zeros_like(x)
    for t in range(T):
        seen = range(max(0, t - window + 1), t + 1)
        for h in range(H):
            scores = torch.stack([q[t, h] @ k[j, h] for j in seen]) / (C // H) ** 0.5
            out[t, h * (C // H):(h + 1) * (C // H)] = scores.softmax(0) @ torch.stack([v[j, h] for j in seen])
    x = x + block.attn_out(out)
    return x + block.proj(F.relu(block.fc(block.ln_2(x))) ** 2)


def loop_ngrams(ngram, row):
    """The hashed n-gram rows of each byte of one row, hashing the n bytes ending there one by one."""
    out = torch.zeros(len(row), ngram.tables[0].weight.size(1), dtype=ngram.tables[0].weight.dtype)
    for t in range(len(row)):
        for n, table in zip((2, 3, 4), ngram.tables):
            if t >= n - 1:  # the whole n-gram is in the window
                code = sum(row[t - i] * 257 ** i for i in range(n))
                out[t] += table.weight[code % ngram.buckets]
    return out
def window_by_hand(T, start, window):
    """The mask of T new bytes at positions start .. start + T - 1 over every key so far, from its definition."""
    return torch.tensor([[j <= start + i and start + i - j < window for j in range(start + T)] for i in range(T)])


@pytest.mark.exercise(11)
@pytest.mark.parametrize("T, start, window", [(6, 0, 3), (1, 9, 4), (4, 5, 1), (5, 2, 64)])
def test_window_mask_is_its_definition(T, start, window):
    mask = bt.window_mask(T, start, window, "cpu")
    assert mask.dtype == torch.bool and torch.equal(mask, window_by_hand(T, start, window))


@pytest.mark.exercise(11)
def test_byte_block_equals_a_loop_and_continues_from_its_cache():
    torch.manual_seed(0)
    block, window = bt.ByteBlock(16, 2).double(), 4
    with torch.no_grad():  # away from the initialisation, so that every path moves the output
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
        x = torch.randn(2, 12, 16, dtype=torch.float64)
        full = block(x, window_by_hand(12, 0, window))
        for b in range(2):
            torch.testing.assert_close(full[b], loop_block(block, x[b], window), rtol=0, atol=F64_ATOL)
        # in pieces, each call's keys and values appended to the cache's: [k, v], each (B, heads, bytes, head size)
        cache, pieces = [], []
        for a, b in [(0, 5), (5, 6), (6, 12)]:
            pieces.append(block(x[:, a:b], window_by_hand(b - a, a, window), cache))
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=F64_ATOL)
    assert len(cache) == 2 and cache[0].shape == cache[1].shape == (2, 2, 12, 8)


@pytest.mark.exercise(12)
def test_run_core_runs_the_core_on_each_rows_chunk_means_like_a_loop():
    pooled = small_model().pooled
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    ends = torch.zeros(3, 10, dtype=torch.bool)
    ends[0, [2, 5, 9]] = True
    ends[1, 0] = True  # row 2 has none: rows differ in how many slots they use
    given = []

    def core(v, cache):  # causal over the slots (a running mean) and nonlinear, like a real core
        given.append(cache)
        return torch.tanh(v.cumsum(dim=1) / torch.arange(1, v.size(1) + 1, dtype=v.dtype)[:, None])

    with torch.no_grad():
        out = pooled.run_core(x, ends, 0, core)
        assert out.shape == (3, 3, 16) and given == [None]
        for b in range(3):
            at = torch.nonzero(ends[b]).flatten().tolist()
            if at:  # each chunk's mean byte state, the row's chunks alone through the core
                starts = [0] + [t + 1 for t in at[:-1]]
                means = torch.stack([x[b, a:t + 1].mean(0) for a, t in zip(starts, at)])
                expected = pooled.down(core(pooled.up(means)[None], None)[0])
                # float64: the batched and the per-row core add the same terms, about 1e-16 apart
                torch.testing.assert_close(out[b, :len(at)], expected, rtol=0, atol=1e-12)

    def no_core(v, cache):
        raise AssertionError("the core ran with no chunk end in any row")

    assert pooled.run_core(x, torch.zeros_like(ends), 0, no_core).shape == (3, 0, 16)


def loop_reference_logits(model, row):
    """
    One row's logits: each layer by loops, the core run on this row's chunks alone (no padding),
    each chunk's input the mean of its bytes' states, and each byte given the output of the last
    chunk ended at or before it.
    """
    pooled, config = model.pooled, model.config
    x = pooled.byte_embedding(row) + pooled.position(torch.arange(len(row)))
    if config.ngram_buckets:
        x = x + loop_ngrams(pooled.ngram, row.tolist())
    for block in pooled.layers_in:
        x = loop_block(block, x, config.byte_window)
    ends = [t for t, end in enumerate(loop_chunk_ends(row.tolist(), config.boundary)) if end]
    if ends:
        starts = [0] + [t + 1 for t in ends[:-1]]
        inputs = [x[a:t + 1].mean(0) for a, t in zip(starts, ends)]
        core_out = model.core(pooled.up(torch.stack(inputs))[None])[0]
        x = x.clone()
        for t in range(len(row)):
            chunk = sum(1 for e in ends if e <= t) - 1  # the last chunk ended at or before t
            if chunk >= 0:
                x[t] = x[t] + pooled.down(core_out[chunk])
    for block in pooled.layers_out:
        x = loop_block(block, x, config.byte_window)
    return model.lm_head(pooled.ln(x))


@pytest.mark.exercise(11, 12)
@pytest.mark.parametrize("ingredients", INGREDIENT_PARAMS)
@pytest.mark.parametrize("boundary", bt.BOUNDARIES)
def test_flat_batched_model_equals_a_loop_reference(boundary, ingredients):
    model = small_model(boundary, **ingredients)
    rng = np.random.default_rng(2)
    idx = boundary_ids(rng, (3, 24), boundary)
    idx[1, :20] = ord("q")  # rows with different numbers of chunk ends (the batched core pads), and a long word
    with torch.no_grad():
        logits = model(idx)[0]
        for b in range(3):
            torch.testing.assert_close(logits[b], loop_reference_logits(model, idx[b]), rtol=0, atol=F64_ATOL)


def test_loss_is_next_byte_cross_entropy_in_nats_per_byte():
    model = small_model()
    idx = spacey_bytes(np.random.default_rng(3), (2, 25))
    with torch.no_grad():
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        _, total = model(idx[:, :-1], idx[:, 1:], reduction="sum")
    expected = -logits.log_softmax(-1).gather(-1, idx[:, 1:, None]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=F64_ATOL)
    assert total.item() == pytest.approx(48 * expected.item(), abs=48 * F64_ATOL)


# ----------------------------------------------------------------------------
# generation

@pytest.mark.exercise(11, 12)
@pytest.mark.parametrize("ingredients", INGREDIENT_PARAMS)
@pytest.mark.parametrize("boundary", bt.BOUNDARIES)
def test_cached_byte_states_equal_a_full_recompute(boundary, ingredients):
    model = small_model(boundary, **ingredients)
    idx = boundary_ids(np.random.default_rng(4), (1, 24), boundary)
    with torch.no_grad():
        full = model.hidden_states(idx)
        cache = model.new_cache(1, "cpu", torch.float64)
        pieces = [model.hidden_states(idx[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 15), *(
            (t, t + 1) for t in range(15, 24)))]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=F64_ATOL)
        assert cache.length == 24
        cache.length = 10  # rewound: the bytes after the tenth are forgotten, and so are the chunks they ended
        assert cache.core.length == int(bt.chunk_ends(idx[:, :10], boundary).sum())
        rewound = model.hidden_states(idx[:, 10:13], cache)
        torch.testing.assert_close(rewound, full[:, 10:13], rtol=0, atol=F64_ATOL)
        cache.length = 0  # a refill starts over
        torch.testing.assert_close(model.hidden_states(idx[:, :5], cache), full[:, :5], rtol=0, atol=F64_ATOL)


@pytest.mark.parametrize("ingredients", INGREDIENT_PARAMS)
def test_generation_with_the_cache_equals_full_recompute(ingredients):
    model = small_model(block_size=48, **ingredients)
    prompt = torch.tensor([list(b"Hello there, ")])
    for sampling in (dict(temperature=0), dict(top_k=50)):
        runs = [torch.cat(list(model.generate_stream(prompt, 30, use_cache=use_cache,
                                                     generator=torch.Generator().manual_seed(0), **sampling)), dim=1)
                for use_cache in (True, False)]
        assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, 30)
    # past the context the cache refills from the newest half and goes on
    assert len(list(model.generate_stream(prompt, 100, temperature=0))) == 100
    with pytest.raises(UserError, match="one sequence at a time"):
        next(model.generate_stream(prompt.expand(2, -1), 1))
    assert len(list(model.generate_stream(prompt.expand(2, -1), 3, use_cache=False))) == 3


# ----------------------------------------------------------------------------
# size

@pytest.mark.exercise(3)
@pytest.mark.parametrize("n_embd", [128, 256, 512])
def test_everything_around_the_core_is_a_small_part_of_a_tied_gpt2_embedding(n_embd):
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=n_embd, block_size=512, embedder="pooled", ngram_buckets=0))
    around = model.num_params()["embedding"]
    assert around <= 0.10 * tk.GPT2_VOCAB * n_embd
    # the default hashed n-grams add three tables of byte width: still a fifth of GPT-2's at most
    with_ngrams = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=n_embd, block_size=512, embedder="pooled"))
    ngram_params = 3 * bt.POOLED_NGRAM_BUCKETS * with_ngrams.config.byte_width
    assert with_ngrams.num_params()["embedding"] == around + ngram_params <= 0.2 * tk.GPT2_VOCAB * n_embd
    # the pooled byte layers and the core's positions; the head is the tied byte embedding
    assert around == sum(p.numel() for p in model.pooled.parameters()) + model.wpe.weight.numel()


# ----------------------------------------------------------------------------
# end to end: prepare, train, sample, as a user runs them

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--byte_width=16",
        "--eval_interval=100", "--eval_tokens=1024", "--log_interval=5", "--threads=1", "--learning_rate=1e-2",
        "--warmup_iters=10", "--embedder=pooled"]


def test_prepare_train_sample_pooled(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat. ", "a ", "dog ", "ran\n"]
    (tmp_path / "tiny.txt").write_text("".join(rng.choice(words, size=4000)))
    folder = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "tiny.txt"), data_dir=str(tmp_path)))
    out = tmp_path / "out"
    train.main([f"--dataset={folder}", f"--out_dir={out}", *TINY, "--max_iters=200"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r]
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"] and evals[-1]["val_bpb"] < 1.5  # 8 bits is a uniform guess
    # train and val loss in one unit, nats per byte: val bits per byte is val loss / ln 2
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / np.log(2))
    last_train = [r["loss"] for r in records if "loss" in r][-1]
    assert abs(last_train - evals[-1]["val_loss"]) < 0.5
    result = subprocess.run([sys.executable, "sample.py", f"--ckpt={out / 'ckpt.pt'}", "--prompt=the ",
                             "--max_new_tokens=40", "--threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("the ") and len(result.stdout) > 30 and "tokens/s" in result.stderr


def test_prepare_train_sample_pooled_by_gpt2_tokens(tmp_path, gpt2):
    rng = np.random.default_rng(0)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat. ", "a ", "dog ", "ran\n", "théâtre "]
    text = "".join(rng.choice(words, size=3000))
    (tmp_path / "tiny.txt").write_text(text)
    folder = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "tiny.txt"), data_dir=str(tmp_path),
                                                   tokenization="bytes_gpt2"))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["vocab_size"] == tk.BYTES_GPT2_VOCAB and meta["train_bytes"] + meta["val_bytes"] == len(text.encode())
    out = tmp_path / "out"
    train.main([f"--dataset={folder}", f"--out_dir={out}", *TINY, "--boundary=gpt2", "--max_iters=40"])
    # bits per byte counts the markers' nats and none of their (zero) bytes: by hand on two windows
    model = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    dataset = train.load_dataset(str(folder), 32)
    result = train.evaluate(model, dataset.val, dataset.token_bytes, 32, max_tokens=64)
    windows = torch.from_numpy(dataset.val[:65].astype(np.int64))
    x, y = torch.stack([windows[:32], windows[32:64]]), torch.stack([windows[1:33], windows[33:65]])
    with torch.no_grad():
        nats = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum").item()
    text_bytes = int((y != tk.GPT2_TOKEN_END).sum())
    assert 0 < text_bytes < y.numel()  # markers were predicted, and are not bytes
    assert result["val_bpb"] == pytest.approx(nats / (np.log(2) * text_bytes), rel=1e-5)
    result = subprocess.run([sys.executable, "sample.py", f"--ckpt={out / 'ckpt.pt'}", "--prompt=the cat",
                             "--max_new_tokens=40", "--threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("the cat") and "\x00" not in result.stdout  # markers print as nothing


def test_gpt2_boundaries_on_bytes_are_a_one_line_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("to be or not to be " * 100)
    folder = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "tiny.txt"), data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="--tokenization=bytes_gpt2"):
        train.main([f"--dataset={folder}", f"--out_dir={tmp_path / 'out'}", *TINY, "--boundary=gpt2"])


def test_a_pooled_model_on_bpe_data_is_a_one_line_error(tmp_path, gpt2):
    (tmp_path / "tiny.txt").write_text("to be or not to be " * 100)
    bpe = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "tiny.txt"), data_dir=str(tmp_path),
                                                tokenization="bpe"))
    with pytest.raises(UserError, match="reads bytes"):
        train.main([f"--dataset={bpe}", f"--out_dir={tmp_path / 'out'}", *TINY])


def test_cli_prints_each_rules_chunks_and_the_parameter_count():
    result = subprocess.run([sys.executable, "byte_tokenizer.py", "to be or not", "--n_embd=256"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "space: 4 chunks, 3.00 bytes each (found from the past): to  | be  | or  | not" in result.stdout
    assert "fixed: 3 chunks, 4.00 bytes each (found from the past): to b | e or |  not" in result.stdout
    try:  # GPT-2's cuts when its files are here (the child inherits TIKTOKEN_CACHE_DIR), else says so
        tk.gpt2_encoding()
        gpt2_line = "gpt2: 4 chunks, 3.00 bytes each (looks ahead: read from bytes_gpt2 data's markers)"
        assert f"{gpt2_line}: to |  be |  or |  not" in result.stdout
    except UserError:
        assert "gpt2: unavailable (could not load tiktoken's gpt2 encoding" in result.stdout
    around = GPT(GPTConfig(n_embd=256, n_head=4, block_size=256, embedder="pooled")).pooled
    count = sum(p.numel() for p in around.parameters())
    assert f"core of width 256: {count:,} parameters; a tied GPT-2 embedding (50,257 x 256)" in result.stdout
