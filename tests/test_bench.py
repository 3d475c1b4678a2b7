"""bench.py: its timed operations compute what they claim, its FLOP counts match a hand count, a tiny sweep reports every field."""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

import bench
import reparam
from cli import UserError
from model import GPT, GPTConfig, preset_config, save_checkpoint

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)


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


def test_ffn_removed_is_the_identity_inside_and_restores_the_model():
    model = tiny_model()
    x = torch.randint(0, 256, (1, 8))
    before = model(x)[0]
    with bench.ffn_removed(model):
        assert all(isinstance(block.mlp, nn.Identity) for block in model.h)
        assert not torch.allclose(model(x)[0], before)
    torch.testing.assert_close(model(x)[0], before, rtol=0, atol=0)


def test_time_split_shares_sum_to_one_and_hooks_are_removed():
    model = tiny_model(share_ffn=True, block_repeat=2)
    split = bench.time_split(model, seq_len=8, repeats=3, warmup=1)
    assert set(split["shares"]) == {"embedding", "attention", "ffn", "norm", "head", "other"}
    assert sum(split["shares"].values()) == pytest.approx(1.0)
    assert all(share >= 0 for share in split["shares"].values())
    assert split["without_ffn_ms"] > 0 and split["ffn_share_removed"] < 1
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_module_timer_times_every_call_of_a_shared_module():
    model = tiny_model(share_ffn=True, block_repeat=3)
    timer = bench.ModuleTimer(model)
    with torch.inference_mode():
        model(torch.zeros((1, 4), dtype=torch.long))
    timer.remove()
    ffn_calls = [span for span in timer.spans if span[0] == "ffn"]
    assert len(ffn_calls) == TINY["n_layer"] * 3


def test_generation_counts_tokens_and_bytes():
    result = bench.time_generation(tiny_model(), n_tokens=20, use_cache=True, repeats=1, token_bytes=[2] * 256)
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
                "--seq_lens=1,8,32", "--batch_sizes=1,2", "--context_lens=1,16", "--split_lens=8",
                "--repeats=2", "--warmup=1", "--train_repeats=1", "--train_batch=2", "--gen_tokens=20",
                "--gen_repeats=1", "--threads=1", f"--out={out}"])
    text = capsys.readouterr().out
    assert "| cpu-tiny |" in text and "threads 1" in text and f"torch {torch.__version__}" in text
    report = json.loads(out.read_text())
    env = report["environment"]
    assert {"device", "torch", "dtype", "threads", "matmul_peak_gflops"} <= set(env) and env["matmul_peak_gflops"] > 0
    (m,) = report["models"]
    assert m["name"] == "cpu-tiny" and m["config"]["n_layer"] == 1
    # T=32 exceeds block_size 16: skipped, shown as "-"
    assert [(p["batch_size"], p["seq_len"]) for p in m["prefill"]] == [(1, 1), (1, 8), (2, 1), (2, 8)]
    assert "| - |" in text
    assert [d["context_len"] for d in m["decode"]] == [1, 16]
    assert all(entry["median_ms"] > 0 for entry in m["prefill"] + m["decode"])
    train = m["train"]
    assert {"tokens_per_s", "flops_per_token", "mfu", "median_ms"} <= set(train)
    assert train["mfu"] == pytest.approx(train["tokens_per_s"] * train["flops_per_token"] / (env["matmul_peak_gflops"] * 1e9))
    assert train["matmul_peak_flops"] <= env["matmul_peak_gflops"] * 1e9
    assert [g["use_cache"] for g in m["generation"]] == [True, False]
    assert m["split"][0]["seq_len"] == 8 and "ffn_share_removed" in m["split"][0]


def test_a_checkpoint_is_benchmarked_with_bytes_per_second_from_its_tokenization(tmp_path, capsys):
    model = tiny_model()
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "data_meta": {"tokenization": "bytes"}}, tmp_path / "ckpt.pt")
    out = tmp_path / "bench.json"
    bench.main([f"--ckpts={tmp_path / 'ckpt.pt'}", "--presets=", "--seq_lens=4", "--context_lens=4", "--split_lens=4",
                "--repeats=1", "--warmup=0", "--train_repeats=1", "--train_batch=1", "--gen_tokens=8",
                "--gen_repeats=1", "--threads=1", f"--out={out}"])
    (m,) = json.loads(out.read_text())["models"]
    assert m["name"].endswith("ckpt.pt") and m["config"] == dataclasses.asdict(model.config)
    cached = m["generation"][0]
    assert cached["bytes_per_s"] == pytest.approx(cached["tokens_per_s"])  # one byte per byte token


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="did you mean --seq_lens"):
        bench.main(["--seq_len=4"])
    with pytest.raises(UserError, match="dtype"):
        bench.main(["--dtype=int8"])
    with pytest.raises(UserError, match="pooled"):
        bench.main(["--tokenizations=pooled"])
    with pytest.raises(UserError, match="comma-separated list of int"):
        bench.main(["--seq_lens=1,x"])
    with pytest.raises(UserError, match="at least 1"):
        bench.main(["--context_lens=0,4"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA events and graphs path needs one")
def test_cuda_prefill_and_decode_with_and_without_graphs():
    model = tiny_model().to("cuda")
    for graphs in (False, True):
        assert bench.time_prefill(model, 8, repeats=3, warmup=1, cuda_graphs=graphs)["median_ms"] > 0
        assert bench.time_decode(model, 8, repeats=3, warmup=1, cuda_graphs=graphs)["median_ms"] > 0


def test_ingredient_step_times_cover_each_ingredient():
    timings = bench.time_ingredients(list(bench.INGREDIENTS), batch_size=2, seq_len=8, rounds=2, warmup=1)
    assert list(timings) == list(bench.INGREDIENTS)
    assert all(0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"] for t in timings.values())
    table = bench.ingredient_table(timings, 2, 8)
    assert table.count("\n") == len(bench.INGREDIENTS) + 1 and "| muon |" in table
