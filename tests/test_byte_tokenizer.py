"""byte_tokenizer.py: chunk ends from the past only, the flat pooled model against a loop reference, exact
probabilities, the KV cache, parameter counts, and a pooled model end to end."""

import dataclasses
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
from model import GPT, GPTConfig, load_checkpoint, model_from_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RULES = bt.BOUNDARIES
FOUND_RULES = ("space", "fixed")  # the rules the model finds from the bytes; gpt2's ends are markers in the data


def small_model(boundary="space", block_size=24, window=6, max_chunk_bytes=5, fixed_chunk_bytes=3, dtype=torch.float32):
    torch.manual_seed(0)
    vocab_size = bt.MARKED_VOCAB if boundary == "gpt2" else tk.BYTE_VOCAB
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size,
                       embedder="pooled", boundary=boundary,
                       max_chunk_bytes=max_chunk_bytes, fixed_chunk_bytes=fixed_chunk_bytes, byte_width=16,
                       byte_heads=2, byte_layers_in=1, byte_layers_out=2, byte_window=window, qk_norm=True,
                       ffn="relu2")
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


def rule_ids(rng, shape, rule):
    """Input for a model under `rule`: spacey bytes, and under gpt2 end markers in a fifth of the places."""
    idx = spacey_bytes(rng, shape)
    if rule == "gpt2":
        idx[torch.from_numpy(rng.random(shape) < 0.2)] = tk.GPT2_TOKEN_END
    return idx


# ----------------------------------------------------------------------------
# chunk ends

@pytest.mark.parametrize("rule", FOUND_RULES)
def test_chunk_ends_are_the_segmenters_cuts_decided_from_the_past(rule):
    rng = np.random.default_rng(0)
    idx = spacey_bytes(rng, (20, 40))
    idx[0, :30] = ord("a")  # a long word: the space rule must cut it at max_chunk_bytes
    ends = bt.chunk_ends(idx, rule, max_chunk_bytes=5, fixed_chunk_bytes=3)
    segmenter = tk.Segmenter(rule, max_chunk_bytes=5, fixed_chunk_bytes=3)
    for row, row_ends in zip(idx, ends):
        cut_after = set((segmenter.offsets(bytes(row.tolist()))[1:-1] - 1).tolist())  # last byte of each chunk
        expected = [t in cut_after for t in range(len(row) - 1)]  # the window's last byte ends it anyway
        assert row_ends[:-1].tolist() == expected
    for t in range(1, 40):  # the rule never looks ahead: a prefix gets the same ends
        assert torch.equal(bt.chunk_ends(idx[:, :t], rule, 5, 3), ends[:, :t])


def test_gpt2_ends_are_markers_in_bytes_gpt2_data_at_gpt2s_cuts(gpt2):
    text = "Hello there, naïve café 東京 🙂!\n  theirs".encode("utf-8") + b"\xff\xfe tail"  # invalid UTF-8 too
    ids = tk.mark_gpt2_token_ends(text)
    assert bytes(ids[ids != tk.GPT2_TOKEN_END].astype(np.uint8)) == text  # lossless
    table = tk.token_byte_table("bytes_gpt2")
    assert b"".join(table[i] for i in ids) == text and table[tk.GPT2_TOKEN_END] == b""
    assert ids[-1] == tk.GPT2_TOKEN_END and tk.encode("bytes_gpt2", "to be") == list(b"to") + [256] + list(b" be") + [256]
    segmenter = tk.Segmenter("gpt2", max_chunk_bytes=len(text))  # GPT-2's own cuts, none split
    chunks = [bytes(c.astype(np.uint8)) for c in np.split(ids, np.flatnonzero(ids == tk.GPT2_TOKEN_END) + 1)[:-1]]
    assert [c[:-1] for c in chunks] == segmenter.split(text)  # each chunk: a token's bytes, then its marker
    ends = bt.chunk_ends(torch.from_numpy(ids.astype(np.int64))[None], "gpt2")[0]
    assert torch.equal(ends, torch.from_numpy(ids == tk.GPT2_TOKEN_END))


def test_each_boundary_reads_its_own_data():
    with pytest.raises(UserError, match="--tokenization=bytes_gpt2"):
        GPTConfig(embedder="pooled", boundary="gpt2").validate()
    GPTConfig(embedder="pooled", boundary="gpt2", vocab_size=bt.MARKED_VOCAB).validate()
    with pytest.raises(UserError, match="bytes_gpt2 data pools with --boundary=gpt2"):
        GPTConfig(embedder="pooled", boundary="space", vocab_size=bt.MARKED_VOCAB).validate()
    with pytest.raises(UserError, match="--boundary=words is not one of space, fixed, gpt2"):
        GPTConfig(embedder="pooled", boundary="words").validate()
    with pytest.raises(UserError, match="reads bytes"):
        GPTConfig(embedder="pooled", vocab_size=50257).validate()


# ----------------------------------------------------------------------------
# the model: causal, exact, and what a plain loop computes

@pytest.mark.parametrize("rule", RULES)
def test_no_byte_prediction_sees_a_later_byte(rule):
    model = small_model(rule)
    rng = np.random.default_rng(1)
    idx = rule_ids(rng, (3, 24), rule)
    an_end = tk.GPT2_TOKEN_END if rule == "gpt2" else ord(" ")
    with torch.no_grad():
        reference = model(idx)[0]
        for t in range(0, 23, 2):
            changed = idx.clone()
            changed[:, t + 1:] = rule_ids(rng, (3, 23 - t), rule)  # byte t + 1 and everything after it
            ended = bt.chunk_ends(idx, rule, 5, 3)[:, t + 1]
            changed[:, t + 1] = torch.where(ended, ord("x"), an_end)  # a chunk end moves (not under fixed)
            logits = model(changed)[0]
            torch.testing.assert_close(logits[:, :t + 1], reference[:, :t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(logits[:, t + 1:], reference[:, t + 1:])  # the test can see a change


@pytest.mark.parametrize("first", [b"a", b" "], ids=["letter", "space"])
def test_probabilities_of_every_two_byte_continuation_sum_to_one(first):
    # chain rule over all 256^2 strings after one byte, in float64: with "a" first, a spacelike second byte
    # ends a chunk and the core's output reaches the third; with " " first, the core runs at byte 0
    model = small_model("space", dtype=torch.float64)
    pairs = torch.cartesian_prod(torch.arange(256), torch.arange(256))
    idx = torch.cat([torch.full((len(pairs), 1), first[0]), pairs], dim=1)
    with torch.no_grad():
        log_p = model(idx[:, :-1])[0].log_softmax(-1)
    per_string = log_p.gather(-1, idx[:, 1:, None]).sum(dim=(1, 2))
    assert per_string.logsumexp(0).item() == pytest.approx(0.0, abs=1e-9)
    assert bt.chunk_ends(idx[:, :-1], "space").any()  # the core ran inside these probabilities


def loop_chunk_ends(row, rule, max_chunk_bytes, fixed_chunk_bytes):
    """The rule as a person states it, one byte at a time, with a counter."""
    ends, length = [], 0
    for t, byte in enumerate(row):
        length += 1
        if rule == "gpt2":
            end = byte == tk.GPT2_TOKEN_END
        elif rule == "fixed":
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


def loop_reference_logits(model, row):
    """One row's logits: each layer by loops, the core run on this row's chunk ends alone (no padding)."""
    pooled, config = model.wte, model.config
    x = pooled.byte_embedding(row) + pooled.position(torch.arange(len(row)))
    for block in pooled.layers_in:
        x = loop_block(block, x, config.byte_window)
    ends = [t for t, end in enumerate(loop_chunk_ends(row.tolist(), config.boundary, config.max_chunk_bytes,
                                                        config.fixed_chunk_bytes)) if end]
    if ends:
        core_out = model.core(pooled.up(x[ends])[None])[0]
        x = x.clone()
        for s, t in enumerate(ends):
            x[t] = x[t] + pooled.down(core_out[s])
    for block in pooled.layers_out:
        x = loop_block(block, x, config.byte_window)
    return model.lm_head(pooled.ln(x))


@pytest.mark.parametrize("rule", RULES)
def test_flat_batched_model_equals_a_loop_reference(rule):
    model = small_model(rule)
    rng = np.random.default_rng(2)
    idx = rule_ids(rng, (3, 24), rule)
    idx[1, :20] = ord("q")  # rows with different numbers of chunk ends: the batched core pads
    with torch.no_grad():
        logits = model(idx)[0]
        for b in range(3):
            torch.testing.assert_close(logits[b], loop_reference_logits(model, idx[b]), rtol=0, atol=1e-5)


def test_loss_is_next_byte_cross_entropy_in_nats_per_byte():
    model = small_model()
    idx = spacey_bytes(np.random.default_rng(3), (2, 25))
    with torch.no_grad():
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        _, total = model(idx[:, :-1], idx[:, 1:], reduction="sum")
    expected = -logits.log_softmax(-1).gather(-1, idx[:, 1:, None]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert total.item() == pytest.approx(48 * expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------
# generation

@pytest.mark.parametrize("rule", RULES)
def test_cached_byte_states_equal_a_full_recompute(rule):
    model = small_model(rule)
    idx = rule_ids(np.random.default_rng(4), (1, 24), rule)
    with torch.no_grad():
        full = model.hidden_states(idx)
        cache = model.new_cache(1, "cpu", torch.float32)
        pieces = [model.hidden_states(idx[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 15), *(
            (t, t + 1) for t in range(15, 24)))]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
        assert cache.length == 24
        cache.length = 10  # rewound: the bytes after the tenth are forgotten, and so are the chunks they ended
        assert cache.core.length == int(bt.chunk_ends(idx[:, :10], rule, 5, 3).sum())
        torch.testing.assert_close(model.hidden_states(idx[:, 10:13], cache), full[:, 10:13], rtol=0, atol=1e-5)
        cache.length = 0  # a refill starts over
        torch.testing.assert_close(model.hidden_states(idx[:, :5], cache), full[:, :5], rtol=0, atol=1e-5)


def test_generation_with_the_cache_equals_full_recompute():
    model = small_model(block_size=48)
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


def test_checkpoints_of_the_earlier_design_load_or_are_refused_in_one_line(tmp_path):
    for embedder in ("tokens", "pooled"):
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
        old_keys = {"embedder": embedder, "encoder_layers": 1, "decoder_layers": 2, "pooling": "mean"}
        save_checkpoint({"model": model.state_dict(), "model_config": {**dataclasses.asdict(model.config), **old_keys}},
                        tmp_path / f"{embedder}.pt")
    assert model_from_checkpoint(load_checkpoint(tmp_path / "tokens.pt")).config == model.config
    with pytest.raises(UserError, match="earlier design"):
        load_checkpoint(tmp_path / "pooled.pt")


# ----------------------------------------------------------------------------
# size

@pytest.mark.parametrize("n_embd", [128, 256, 512])
def test_everything_around_the_core_is_under_a_tenth_of_a_tied_gpt2_embedding(n_embd):
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=n_embd, block_size=512, embedder="pooled"))
    around = model.num_params()["embedding"]
    assert around <= 0.10 * tk.GPT2_VOCAB * n_embd
    assert around == bt.pooled_parameters(n_embd, 512) + model.wpe.weight.numel()  # the head is the tied embedding


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
    assert meta["vocab_size"] == bt.MARKED_VOCAB and meta["train_bytes"] + meta["val_bytes"] == len(text.encode())
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


def test_pooled_data_and_gpt2_boundaries_on_bytes_are_one_line_errors(tmp_path):
    bad = subprocess.run([sys.executable, "data/prepare.py", "--tokenization=pooled"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "--embedder=pooled" in bad.stderr
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


def test_cli_prints_chunks_and_parameter_counts():
    result = subprocess.run([sys.executable, "byte_tokenizer.py", "to be or not", "--n_embd=256"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in tk.SEGMENTERS:
        assert f"{name}: " in result.stdout
    assert "tied GPT-2 embedding (50,257 x 256)" in result.stdout
