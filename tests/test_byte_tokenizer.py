"""byte_tokenizer.py: pooling, the byte decoder, its exact probabilities and bits per byte, pooled end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import byte_tokenizer as bt
import tokenizer as tk
import train
from data import prepare
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


def small_model(pooling="mean", max_chunk_bytes=8, block_size=16):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, embedder="pooled",
                       max_chunk_bytes=max_chunk_bytes, byte_width=16, byte_heads=2, encoder_layers=1, decoder_layers=2,
                       pooling=pooling)
    return GPT(config).eval()


def random_chunks(rng, shape, max_chunk_bytes):
    """(*shape, max_chunk_bytes) chunks of random bytes, 1..max_chunk_bytes each, padded with PAD."""
    lengths = rng.integers(1, max_chunk_bytes + 1, size=shape)
    values = rng.integers(0, 256, size=(*shape, max_chunk_bytes))
    return torch.from_numpy(np.where(np.arange(max_chunk_bytes) < lengths[..., None], values, tk.PAD))


# ----------------------------------------------------------------------------
# the pooling encoder

@pytest.mark.parametrize("pooling", bt.POOLINGS)
def test_padding_never_changes_the_pooled_vector(pooling):
    embedder = small_model(pooling).wte
    with torch.no_grad():
        if embedder.query is not None:
            embedder.query.normal_()  # not the mean it starts as
    rng = np.random.default_rng(0)
    chunks = random_chunks(rng, (3, 5), 8)
    mask = chunks >= 0
    garbage = torch.from_numpy(rng.integers(0, 256, size=chunks.shape))
    reference = embedder(chunks)
    # anything in the padded slots: the same vectors, exactly
    torch.testing.assert_close(embedder.pool(torch.where(mask, chunks, garbage), mask), reference, rtol=0, atol=0)
    # more padding columns: the same vectors
    wider = torch.cat([chunks, torch.full((3, 5, 4), tk.PAD)], dim=-1)
    torch.testing.assert_close(embedder(wider), reference)
    # each chunk alone, unpadded: the same vector as in the batch
    for b, t in [(0, 0), (2, 4)]:
        alone = chunks[b, t][mask[b, t]][None, None]
        torch.testing.assert_close(embedder(alone)[0, 0], reference[b, t])


# ----------------------------------------------------------------------------
# causality and the decoder's probabilities

def test_no_chunk_sees_the_future():
    torch.manual_seed(0)
    model = small_model()
    rng = np.random.default_rng(3)
    T, M = 6, 8
    window = random_chunks(rng, (2, T + 1), M)
    x, y = window[:, :-1], window[:, 1:]
    logits, _ = model(x, y)
    layout = bt.chunk_targets(y) >= 0
    reference_h, reference = model.hidden_states(x), bt.unpack(logits, layout)
    for s in range(T):
        for _ in range(3):
            changed = window.clone()
            length = int((changed[0, s + 1] >= 0).sum())
            k = int(rng.integers(0, length))  # a byte of chunk s + 1 ...
            changed[0, s + 1, k] = (changed[0, s + 1, k] + 1 + int(rng.integers(0, 255))) % 256
            changed[0, s + 2:] = random_chunks(rng, (T - s - 1,), M)  # ... and everything after it
            x2, y2 = changed[:, :-1], changed[:, 1:]
            logits2, _ = model(x2, y2)
            h2, after = model.hidden_states(x2), bt.unpack(logits2, bt.chunk_targets(y2) >= 0)
            torch.testing.assert_close(h2[:, :s + 1], reference_h[:, :s + 1])
            torch.testing.assert_close(after[:, :s], reference[:, :s])  # earlier chunks' decoders
            # chunk s + 1 is decoded at s: predictions of its bytes up to k (positions 0..k) see only bytes < k
            torch.testing.assert_close(after[0, s, :k + 1], reference[0, s, :k + 1])
            torch.testing.assert_close(after[1], reference[1])  # the other row of the batch


def test_decoder_probabilities_sum_to_one():
    # with chunks of at most 2 bytes there are 256 + 256^2 possible chunks: score them all, in float64
    torch.manual_seed(0)
    M = 2
    decoder = bt.ByteDecoder(n_embd=8, width=8, n_head=2, n_layer=2, max_chunk_bytes=M).double()
    for p in decoder.parameters():
        torch.nn.init.normal_(p, std=0.5)  # far from uniform
    pairs = torch.cartesian_prod(torch.arange(256), torch.arange(256))
    singles = torch.stack([torch.arange(256), torch.full((256,), tk.PAD)], dim=1)
    chunks = torch.cat([singles, pairs])[:, None, :]  # (65792, 1, 2)
    for h in torch.randn(2, 8, dtype=torch.float64):
        logits = decoder(h.expand(len(chunks), 1, 8), chunks)
        targets = bt.chunk_targets(chunks)
        log_p = logits.log_softmax(-1).gather(-1, targets[targets >= 0][:, None])[:, 0]
        per_chunk = bt.unpack(log_p, targets >= 0).sum(dim=(-1, -2))
        assert per_chunk.logsumexp(0).item() == pytest.approx(0.0, abs=1e-9)


def test_bits_per_byte_of_a_uniform_decoder():
    # a decoder that outputs all-zero logits is uniform over what may come next:
    # the first byte costs ln 256, each later byte and the end ln 257, and after
    # max_chunk_bytes bytes the end is certain and costs nothing
    M, T = 4, 5
    model = small_model(max_chunk_bytes=M, block_size=T)
    with torch.no_grad():
        model.lm_head.head.weight.zero_()
    data = b"to be, or not to be: that is the question; whether 'tis nobler in the mind"
    segmenter = tk.Segmenter("space", max_chunk_bytes=M)
    store = tk.ChunkedBytes(np.frombuffer(data, dtype=np.uint8), segmenter.offsets(data), M)
    result = train.evaluate(model, store, None, block_size=T)
    n_windows = (len(store) - 1) // T
    targets = [c for w in range(n_windows) for c in segmenter.split(data)[w * T + 1:(w + 1) * T + 1]]
    nats = sum(math.log(256) + (len(c) - 1) * math.log(257) + (math.log(257) if len(c) < M else 0) for c in targets)
    n_bytes = sum(len(c) for c in targets)
    assert result["val_bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-6)
    assert result["val_loss"] == pytest.approx(nats / len(targets), rel=1e-6)


# ----------------------------------------------------------------------------
# parameters and generation

@pytest.mark.parametrize("n_embd", [128, 256])
def test_pooled_embedder_and_head_are_under_a_tenth_of_a_tied_gpt2_embedding(n_embd):
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=n_embd, embedder="pooled"))
    pooled = sum(p.numel() for m in (model.wte, model.lm_head) for p in m.parameters())
    assert pooled <= 0.10 * tk.GPT2_VOCAB * n_embd
    assert pooled == bt.pooled_parameters(n_embd, bt.BYTE_WIDTH, bt.BYTE_HEADS, bt.ENCODER_LAYERS, bt.DECODER_LAYERS,
                                          tk.MAX_CHUNK_BYTES)


def test_generation_streams_whole_chunks_and_the_cache_changes_nothing():
    model = small_model()
    prompt = torch.from_numpy(tk.pad_chunks(tk.Segmenter("space").split(b"Hello there, "), 8).astype(np.int64))[None]
    with_cache = torch.cat(list(model.generate_stream(prompt, 20, temperature=0)), dim=1)
    without = torch.cat(list(model.generate_stream(prompt, 20, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(with_cache, without) and with_cache.shape == (1, 20, 8)
    lengths = (with_cache >= 0).sum(-1)
    assert ((lengths >= 1) & (lengths <= 8)).all()
    assert torch.equal(with_cache >= 0, torch.arange(8) < lengths[..., None])  # bytes first, then padding
    generator = torch.Generator().manual_seed(0)
    sampled = torch.cat(list(model.generate_stream(prompt, 5, top_k=50, generator=generator)), dim=1)
    assert sampled.shape == (1, 5, 8)


# ----------------------------------------------------------------------------
# end to end: prepare, train, sample, as a user runs them

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--byte_width=16",
        "--eval_interval=100", "--eval_tokens=512", "--log_interval=5", "--threads=1", "--learning_rate=1e-2",
        "--warmup_iters=10"]


def test_prepare_train_sample_pooled(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat. ", "a ", "dog ", "ran\n"]
    (tmp_path / "tiny.txt").write_text("".join(rng.choice(words, size=4000)))
    folder = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "tiny.txt"), tokenization="pooled",
                                                   segmenter="space", data_dir=str(tmp_path)))
    assert folder.name == "tiny_pooled_space"
    dataset = train.load_dataset(str(folder), block_size=16)
    assert dataset.meta["segmenter"] == "space" and len(dataset.train) == dataset.meta["train_tokens"]
    everything = dataset.train[np.arange(len(dataset.train))]
    train_text = (tmp_path / "tiny.txt").read_bytes()[:dataset.meta["train_bytes"]]
    assert b"".join(tk.chunk_bytes(row) for row in everything) == train_text

    out = tmp_path / "out"
    train.main([f"--dataset={folder}", f"--out_dir={out}", *TINY, "--max_iters=200"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_bpb"] for r in records if "val_bpb" in r]
    assert evals[-1] < evals[0] and evals[-1] < 1.5  # learns the tiny language (8 bits per byte is a uniform guess)
    result = subprocess.run([sys.executable, "sample.py", f"--ckpt={out / 'ckpt.pt'}", "--prompt=the ",
                             "--max_new_tokens=10", "--threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("the ") and len(result.stdout) > 15 and "tokens/s" in result.stderr


def test_cli_prints_chunks_and_parameter_counts():
    result = subprocess.run([sys.executable, "byte_tokenizer.py", "to be or not", "--n_embd=256"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in tk.SEGMENTERS:
        assert f"{name}: " in result.stdout
    assert "tied GPT-2 embedding (50,257 x 256)" in result.stdout
    bad = subprocess.run([sys.executable, "data/prepare.py", "--tokenization=pooled", "--segmenter=words"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "--segmenter" in bad.stderr
