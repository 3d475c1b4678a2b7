"""bench.py: its timed operations compute what they claim, its FLOP counts match a hand count, a tiny sweep reports every field."""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

import bench
import reparam
import train
from cli import UserError
from model import GPT, GPTConfig, preset_config, save_checkpoint

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)
SLEEP_S = 0.01


def tiny_model(**overrides):
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def test_summarize_ms_median_and_nearest_rank_percentiles():
    stats = bench.summarize_ms([float(v) for v in range(10, 0, -1)])  # 1..10, unordered
    assert stats == {"median_ms": 5.5, "p10_ms": 2.0, "p90_ms": 9.0}


def test_time_prefill_reports_median_and_spread():
    stats = bench.time_prefill(tiny_model(), seq_len=8, repeats=5, warmup=1)
    assert set(stats) == {"median_ms", "p10_ms", "p90_ms"}
    assert 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]


def test_decode_step_matches_full_forward(monkeypatch):
    # the timed decode call (cache rewound to context_len - 1, one new token)
    # must give the logits of a full forward pass over the same tokens
    model = tiny_model(pos="rope", norm="rmsnorm", ffn="swiglu")
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


@pytest.mark.parametrize("shape", [dict(), dict(share_ffn=True, block_repeat=3)])
def test_time_split_attributes_a_known_time_to_the_ffn_and_leaves_the_model_as_it_was(shape, monkeypatch):
    # a fake clock that only the FFN advances: the attribution is then exact, whatever the machine's load
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    model = tiny_model(**shape)
    sleep = Sleep(clock)  # one module for every block: a shared FFN is hooked once and timed at every call
    for block in model.h:
        block.mlp = sleep
    calls = TINY["n_layer"] * model.config.block_repeat
    prefill_ms = bench.time_prefill(model, 8, repeats=3, warmup=1)["median_ms"]
    split = bench.time_split(model, 8, prefill_ms, repeats=3, warmup=1)
    ms = split["module_ms"]
    assert ms["ffn"] == pytest.approx(1000 * SLEEP_S * calls)  # per prefill
    assert ms["attention"] + ms["norm"] + ms["embedding"] + ms["head"] == 0  # nothing counted elsewhere
    assert prefill_ms == pytest.approx(1000 * SLEEP_S * calls) and split["ffn_share_removed"] == pytest.approx(1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(block.mlp is sleep for block in model.h)  # every FFN back in place


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_runs_the_work_it_claims(use_cache):
    model = tiny_model()
    block_size, n_tokens = TINY["block_size"], 20
    seen = []  # tokens each step runs through the model
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
    assert merged.config.ffn_merged and not model.config.ffn_merged  # merged a copy: the training form is kept
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
    pooled = tiny_model(embedder="pooled")
    save_checkpoint({"model": pooled.state_dict(), "model_config": dataclasses.asdict(pooled.config)}, tmp_path / "p.pt")
    with pytest.raises(UserError, match="p.pt is a pooled byte model"):
        bench.main([f"--ckpts={tmp_path / 'p.pt'}"])
    with pytest.raises(UserError, match="cpu-tiny is a pooled byte model"):
        bench.main(["--presets=cpu-tiny", "--embedder=pooled"])


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
