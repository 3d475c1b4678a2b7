"""bench.py: its timed operations compute what they claim, its FLOP counts match a hand count, a tiny sweep reports every field."""

import dataclasses
import json
import re

import pytest
import torch
import torch.nn as nn

import bench
import reparam
import train
from cli import UserError
from model import GPT, GPTConfig, KVCache, preset_config, save_checkpoint

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)
SLEEP_S = 0.01


def tiny_model(**overrides):
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


@pytest.mark.exercise(5)
def test_summarize_ms_median_and_nearest_rank_percentiles():
    stats = bench.summarize_ms([float(v) for v in range(10, 0, -1)])  # 1..10, unordered
    assert stats == {"median_ms": 5.5, "p10_ms": 2.0, "p90_ms": 9.0}


@pytest.mark.exercise(5)
def test_time_prefill_reports_median_and_spread():
    stats = bench.time_prefill(tiny_model(), seq_len=8, repeats=5, warmup=1)
    assert set(stats) == {"median_ms", "p10_ms", "p90_ms"}
    assert 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]


@pytest.mark.parametrize("embedder", ["tokens", "pooled"])
def test_decode_step_matches_full_forward(monkeypatch, embedder):
    # the timed decode call (cache rewound to context_len - 1, one new token)
    # must give the logits of a full forward pass over the same tokens
    model = tiny_model(pos="rope", norm="rmsnorm", ffn="swiglu", embedder=embedder, byte_width=16)
    calls = []
    monkeypatch.setattr(bench, "time_fn", lambda fn, *args, **kwargs: calls.append(fn) or {})
    torch.manual_seed(3)
    bench.time_decode(model, context_len=10)
    torch.manual_seed(3)
    prompt = torch.randint(0, model.config.vocab_size, (1, 10))  # the same draw time_decode made
    with torch.inference_mode():
        reference = model(prompt)[0][:, -1]
        for _ in range(2):  # twice: rewinding makes every call decode the same position
            torch.testing.assert_close(calls[0](), reference, rtol=1e-5, atol=1e-5)


def test_decode_refuses_a_context_longer_than_block_size():
    with pytest.raises(ValueError, match="exceeds block_size"):
        bench.time_decode(tiny_model(), context_len=TINY["block_size"] + 1, repeats=1, warmup=0)


def test_train_flops_match_a_hand_count_for_cpu_tiny():
    model = GPT(preset_config("cpu-tiny"))
    d, layers, vocab, T = 128, 4, 256, 64
    per_layer = d * 3 * d + d * d + 2 * d * 4 * d  # qkv, attention projection, GELU FFN in and out
    n = layers * per_layer + vocab * d  # + the head (tied: the embedding lookup is no matmul)
    assert bench.matmul_params(model) == n == 819_200
    assert bench.train_flops_per_token(model, T) == 6 * n + 12 * layers * d * T == 5_308_416
    # decode: one forward multiply-add per weight, and QK^T and AV over the context
    assert bench.decode_flops_per_token(model, T) == 2 * n + 4 * layers * d * T == 1_769_472
    pooled = tiny_model(embedder="pooled", byte_width=16)
    assert bench.decode_flops_per_token(pooled, 8) is None  # its core runs at chunk ends only


@pytest.mark.parametrize("overrides", [dict(), dict(block_repeat=2, share_ffn=True, ffn="swiglu", n_kv_head=1),
                                       dict(tie_embeddings=False, vocab_size=300)])
def test_matmul_params_count_every_multiply_a_forward_pass_does(overrides):
    # reference: count multiply-adds per token at every nn.Linear call, repeats and sharing included
    model = tiny_model(**overrides)
    counted = []
    hook = lambda module, args, output: counted.append(module.in_features * module.out_features)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(hook)
    model(torch.zeros((1, 4), dtype=torch.long))
    assert bench.matmul_params(model) == sum(counted)


class Sleep(nn.Module):
    """An FFN that does nothing but take a known time, on a clock that only it moves (see the test)."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def forward(self, x):
        self.clock[0] += SLEEP_S
        return x


@pytest.mark.exercise(5)
@pytest.mark.parametrize("shape", [dict(), dict(share_ffn=True, block_repeat=3)])
def test_time_split_attributes_a_known_time_to_the_ffn_and_leaves_the_model_as_it_was(shape, monkeypatch):
    # a fake clock that only the FFN advances: the attribution is then exact, whatever the machine's load
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    model = tiny_model(**shape)
    sleep = Sleep(clock)  # one module for every block: a shared FFN is hooked once and timed at every call
    for block in model.h:
        block.ffn = sleep
    calls = TINY["n_layer"] * model.config.block_repeat
    prefill_ms = bench.time_prefill(model, 8, repeats=3, warmup=1)["median_ms"]
    split = bench.time_split(model, 8, prefill_ms, repeats=3, warmup=1)
    ms = split["module_ms"]
    assert ms["ffn"] == pytest.approx(1000 * SLEEP_S * calls)  # per prefill
    assert ms["attention"] + ms["norm"] + ms["embedding"] + ms["head"] == 0  # nothing counted elsewhere
    assert prefill_ms == pytest.approx(1000 * SLEEP_S * calls) and split["ffn_share_removed"] == pytest.approx(1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(block.ffn is sleep for block in model.h)  # every FFN back in place


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_runs_the_work_it_claims(use_cache, monkeypatch):
    model = tiny_model()
    block_size, n_tokens = TINY["block_size"], 20
    seen = []  # tokens each step runs through the model
    plain_store = KVCache.store

    def store(cache, slot, k, v):
        # each step writes its tokens' keys into the first layer's cache (the Decoder calls no module)
        if slot == 0:
            seen.append(k.size(2))
        return plain_store(cache, slot, k, v)
    if use_cache:
        monkeypatch.setattr(KVCache, "store", store)
    else:
        model.h[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].size(1)))
    bench.time_generation(model, n_tokens, use_cache)
    timed = seen[-n_tokens:]  # the timed run, after the warm-up
    if use_cache:  # one new token a step, but for the refill from half a window once the context is full
        assert timed.count(1) >= n_tokens - 2 and max(timed) < block_size
    else:  # nanoGPT's sample.py: the last block_size tokens recomputed every step
        assert timed == [min(step, block_size) for step in range(1, n_tokens + 1)]


def test_generation_counts_tokens_and_bytes():
    result = bench.time_generation(tiny_model(), n_tokens=20, use_cache=True, token_bytes=[2] * 256)
    assert result["tokens_per_s"] > 0
    assert result["bytes_per_s"] == pytest.approx(2 * result["tokens_per_s"])


@pytest.mark.parametrize("ffn", ["rep_linear", "rep_parallel", "rep_anneal"])
def test_merged_variant_computes_what_the_training_form_computes(ffn):
    assert bench.merged_variant(tiny_model()) is None  # a standard FFN has nothing to merge
    model = tiny_model(ffn=ffn).eval()
    merged = bench.merged_variant(model)
    assert merged.config.ffn != model.config.ffn == ffn  # merged a copy: the training form is kept
    assert bench.merged_variant(merged) is None  # and a merged model is not merged again
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    reference = reparam.complete_anneal(model)  # the form rep_anneal merges from
    torch.testing.assert_close(merged(idx)[0], reference(idx)[0], rtol=1e-4, atol=1e-5)


def test_tiny_sweep_writes_markdown_and_the_documented_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--presets=cpu-tiny", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16",
                "--seq_lens=1,8,32", "--context_lens=1,16",
                "--repeats=2", "--warmup=1", "--train_repeats=1", "--train_batch=2", "--gen_tokens=20",
                "--threads=1", f"--out={out}"])
    text = capsys.readouterr().out
    assert "| cpu-tiny |" in text and "threads 1" in text and f"torch {torch.__version__}" in text
    report = json.loads(out.read_text())
    env = report["environment"]
    assert {"device", "torch", "dtype", "threads", "matmul_peak_gflops"} <= set(env) and env["matmul_peak_gflops"] > 0
    (m,) = report["models"]
    assert m["name"] == "cpu-tiny" and m["config"]["n_layer"] == 1
    # T=32 exceeds block_size 16: skipped, shown as "-"
    assert [p["seq_len"] for p in m["prefill"]] == [1, 8]
    assert "| - |" in text
    assert [d["context_len"] for d in m["decode"]] == [1, 16]
    for d in m["decode"]:
        assert d["mfu"] == pytest.approx(d["flops_per_token"] / (d["median_ms"] / 1000) / (env["matmul_peak_gflops"] * 1e9))
    assert "MFU" in text.split("Decode latency")[1].split("Throughput")[0]
    assert all(entry["median_ms"] > 0 for entry in m["prefill"] + m["decode"])
    train = m["train"]
    assert {"tokens_per_s", "flops_per_token", "mfu", "median_ms"} <= set(train)
    assert train["mfu"] == pytest.approx(train["tokens_per_s"] * train["flops_per_token"] / (env["matmul_peak_gflops"] * 1e9))
    assert train["matmul_peak_flops"] <= env["matmul_peak_gflops"] * 1e9
    assert [g["use_cache"] for g in m["generation"]] == [True, False]
    assert all(0 < p["without_ffn_ms"] and set(p["module_ms"]) == set(bench.SPLIT_CATEGORIES) for p in m["prefill"])


def test_checkpoints_alone_are_benchmarked_side_by_side_with_bytes_per_second(tmp_path):
    # what reparam.py tells its user to run: the original and the merged checkpoint, nothing else
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for path, ffn in zip(paths, ("rep_linear", "gelu")):
        model = tiny_model(ffn=ffn)
        save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                         "data_meta": {"tokenization": "bytes"}}, path)
    out = tmp_path / "bench.json"
    bench.main([f"--ckpts={paths[0]},{paths[1]}", "--seq_lens=4", "--context_lens=4", "--repeats=1", "--warmup=0", "--train_repeats=1", "--train_batch=1", "--gen_tokens=8",
                "--threads=1", f"--out={out}"])
    models = json.loads(out.read_text())["models"]
    assert [m["name"] for m in models] == [str(p) for p in paths]  # no presets, no merged variant
    assert models[0]["config"]["ffn"] == "rep_linear" and models[1]["config"] == dataclasses.asdict(model.config)
    cached = models[1]["generation"][0]
    assert cached["bytes_per_s"] == pytest.approx(cached["tokens_per_s"])  # one byte per byte token


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="did you mean --seq_lens"):
        bench.main(["--seq_len=4"])
    with pytest.raises(UserError, match="dtype"):
        bench.main(["--dtype=int8"])
    with pytest.raises(UserError, match="comma-separated list of int"):
        bench.main(["--seq_lens=1,x"])
    with pytest.raises(UserError, match="at least 1"):
        bench.main(["--context_lens=0,4"])


def test_a_pooled_model_is_benchmarked_per_byte(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--presets=cpu-tiny", "--embedder=pooled", "--n_layer=1", "--n_embd=32", "--n_head=2", "--byte_width=16",
                "--seq_lens=8", "--context_lens=8", "--repeats=1", "--warmup=0", "--train_repeats=1", "--train_batch=1",
                "--gen_tokens=8", "--threads=1", f"--out={out}"])
    (m,) = json.loads(out.read_text())["models"]
    assert m["config"]["embedder"] == "pooled" and m["prefill"][0]["module_ms"] is None  # nested hooks: no split
    cached = m["generation"][0]
    assert cached["use_cache"] and cached["bytes_per_s"] == pytest.approx(cached["tokens_per_s"])
    assert m["train"]["tokens_per_s"] > 0 and m["train"]["flops_per_token"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA events and graphs path needs one")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_prefill_and_decode_compute_the_models_logits(monkeypatch, cuda_graphs):
    # the timed call, eager or replayed from a CUDA graph, gives the logits of a full forward pass
    model = tiny_model(pos="rope").to("cuda")
    timed = []
    monkeypatch.setattr(bench, "time_fn", lambda fn, *args, **kwargs: timed.append(fn) or {})
    for time_it in (bench.time_prefill, bench.time_decode):
        torch.manual_seed(3)
        time_it(model, 8, cuda_graphs=cuda_graphs)
        torch.manual_seed(3)
        prompt = torch.randint(0, model.config.vocab_size, (1, 8), device="cuda")  # the same draw
        with torch.inference_mode():
            reference = model(prompt)[0][:, -1]
            for _ in range(2):  # a replay rewrites its output in place: the same logits every call
                torch.testing.assert_close(timed[-1]().clone(), reference, rtol=1e-4, atol=1e-4)


def test_training_step_learns_its_batch_and_time_train_step_keeps_the_model():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timing = bench.time_train_step(model, batch_size=2, seq_len=8, dtype=torch.float32, repeats=2)
    assert timing["tokens_per_s"] > 0 and timing["batch_size"] * timing["seq_len"] == 16
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a copy was trained
    # the step optimises: a few steps of train.py's recipe on its fixed batch lower the batch's loss
    step = bench.training_step(model.train(), train.TrainConfig(), 2, 8, torch.float32)
    losses = [step().item() for _ in range(6)]
    assert losses[-1] < losses[0] - 0.1


# a sweep that takes about a second: one tiny model, one length, one call per measurement
QUICK_SWEEP = ["--presets=cpu-tiny", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--seq_lens=4",
               "--context_lens=4", "--repeats=1", "--warmup=0", "--train_repeats=1", "--train_batch=1",
               "--gen_tokens=0", "--threads=1"]


@pytest.mark.parametrize("arg, message", [
    ("--repeats=0", "--repeats must be at least 1, got 0"),
    ("--train_repeats=0", "--train_repeats must be at least 1, got 0"),
    ("--train_batch=0", "--train_batch must be at least 1, got 0"),  # it used to time a step of nothing: zeros
    ("--warmup=-1", "--warmup must be at least 0, got -1"),
    ("--gen_tokens=-1", "--gen_tokens must be at least 0, got -1"),
    ("--train_len=-1", "--train_len must be at least 0, got -1"),
    ("--threads=-1", "--threads must be 0 (the idle cores) up to the"),
    ("--ffn=relu2", "did you mean --ffns?"),  # the FFN is swept by --ffns, not set by a model key
    ("--pos=rope", "unknown option --pos"),  # bench overrides the presets' shape only: a recipe is a preset's
    ("--seq_lens=4,x", "--seq_lens expects a comma-separated list of int"),
    ("--context_lens=0,4", "--context_lens values must be at least 1"),
    ("--ffns=gelu,bogus", "--ffns: bogus is not one of gelu"),
])
def test_bad_options_are_refused_before_anything_is_measured(tmp_path, monkeypatch, arg, message):
    monkeypatch.setattr(bench, "bench_model", lambda *args: pytest.fail("measured despite a bad option"))
    with pytest.raises(UserError, match=re.escape(message)):
        bench.main([*QUICK_SWEEP, f"--out={tmp_path / 'bench.json'}", arg])


def test_shape_overrides_with_checkpoints_alone_are_refused():
    # a checkpoint is timed as trained: --n_layer would silently change nothing (refused before loading it)
    with pytest.raises(UserError, match="--n_layer changes the presets' shape.*--presets"):
        bench.main(["--ckpts=a.pt", "--n_layer=2"])


def measured_model(ffn_share_removed):
    """What bench_model returns for one model, at one length of each kind, with no generation."""
    timing = {"median_ms": 2.0, "p10_ms": 1.0, "p90_ms": 3.0}
    return {"name": "fake", "params": {"total": 1e6}, "flops_per_byte": None,
            "prefill": [{"seq_len": 4, **timing, "without_ffn_ms": 2.0 * (1 - ffn_share_removed),
                         "ffn_share_removed": ffn_share_removed, "module_ms": None}],
            "decode": [{"context_len": 4, **timing, "flops_per_token": 1e6}], "generation": [],
            "train": {**timing, "batch_size": 1, "seq_len": 4, "tokens_per_s": 2000.0, "flops_per_token": 1e6,
                      "matmul_peak_flops": 1e10}}


@pytest.fixture
def measured(monkeypatch):
    """main with the measurement replaced by measured_model(share): what it prints and writes, and nothing else."""
    def measure(share):
        monkeypatch.setattr(bench, "build_variants", lambda *args: [("fake", None, None)])
        monkeypatch.setattr(bench, "bench_model", lambda *args: measured_model(share))
    return measure


def test_an_unwritable_out_prints_the_tables_then_one_line(tmp_path, capsys, measured):
    measured(0.5)
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "bench.json"  # a folder that cannot be made, even by root
    with pytest.raises(UserError, match=f"could not write {out}.*the tables above.*--out"):
        bench.main(["--seq_lens=4", "--context_lens=4", "--threads=1", f"--out={out}"])
    assert "| fake | 4 | 2.00 | - | - | - | - | - | - | 50% |" in capsys.readouterr().out  # the measurement is kept


def test_a_negative_ffn_share_is_shown_as_noise(tmp_path, capsys, measured):
    # under load the model without its FFNs can time slower than the whole model
    measured(-0.25)
    bench.main(["--seq_lens=4", "--context_lens=4", "--threads=1", f"--out={tmp_path / 'bench.json'}"])
    assert "| fake | 4 | 2.00 | - | - | - | - | - | - | 0% (noise) |" in capsys.readouterr().out
    # the JSON keeps what was measured
    (m,) = json.loads((tmp_path / "bench.json").read_text())["models"]
    assert m["prefill"][0]["ffn_share_removed"] == -0.25


def test_flops_per_byte_counts_a_forward_pass_over_the_bytes_it_covers():
    byte_model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    per_byte = bench.flops_per_byte(byte_model)
    # random bytes, one byte per token: a forward pass over the context, over its length; training 3x
    assert per_byte["inference"] == reparam.forward_flops(byte_model, 32) / 32
    assert per_byte["train"] == 3 * per_byte["inference"] and not per_byte["on_text"]
    # a pooled model's core runs once per chunk: a text cut into more chunks costs more per byte
    pooled = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, embedder="pooled",
                           byte_width=16)).eval()
    costs = []
    for text in (b"a" * 32, b"a " * 16):  # 2 chunks (max_chunk_bytes 16) against 16
        pooled.text = (torch.tensor([list(text)]), 32)
        costs.append(bench.flops_per_byte(pooled))
    assert costs[0]["on_text"] and costs[0]["inference"] < costs[1]["inference"]
    # a token model with no text at hand: its bytes per token are unknown
    assert bench.flops_per_byte(GPT(GPTConfig(block_size=8, vocab_size=1000, n_layer=1, n_head=2, n_embd=16))) is None
