"""train.py: configuration, data, bits per byte, the loop, checkpoints and resume."""

import contextlib
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import optim
import train
from cli import UserError
from data import prepare
from conftest import TINY_TRAIN_ARGS as TINY
from model import GPT, GPTConfig, load_checkpoint, preset_config

ROOT = Path(__file__).resolve().parent.parent



def run_train(dataset, out_dir, *args):
    train.main(["--dataset=" + dataset, "--out_dir=" + str(out_dir), *TINY, *args])
    return load_checkpoint(out_dir / "ckpt.pt")


# ----------------------------------------------------------------------------
# configuration

def test_unknown_key_names_the_closest():
    with pytest.raises(UserError, match="did you mean --learning_rate"):
        train.configure(["--learning_rat=1e-3"])


def test_model_keys_override_the_preset():
    config, model_config, _ = train.configure(["--preset=stlm-10m", "--n_layer=3", "--batch_size=2"])
    assert (config.preset, config.batch_size) == ("stlm-10m", 2)
    assert (model_config.n_layer, model_config.n_embd, model_config.ffn) == (3, 256, "swiglu")


def test_bad_values_are_user_errors():
    for args in (["--batch_size=many"], ["--compile=maybe"], ["--max_iters=0"], ["--preset=huge"]):
        with pytest.raises(UserError):
            train.configure(args)


def test_help_lists_every_key():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    keys = [k for k in [*train.TrainConfig.__dataclass_fields__, *GPTConfig.__dataclass_fields__] if k != "vocab_size"]
    for key in keys:
        assert f"--{key} " in result.stdout
    # the data sets the vocabulary: not an option
    assert "--vocab_size" not in result.stdout
    assert len(re.findall(r"^  --\w+", result.stdout, re.MULTILINE)) == len(keys) <= 45
    # model defaults are the default preset's, not GPTConfig's
    default_preset = preset_config(train.TrainConfig.preset)
    for key in ("n_layer", "n_embd", "block_size", "ffn", "qk_norm"):
        assert re.search(rf"--{key} \S+ +default: {re.escape(repr(getattr(default_preset, key)))}\n", result.stdout), key


# ----------------------------------------------------------------------------
# learning rate, bits per byte

@pytest.mark.exercise(2)
def test_learning_rate_schedule():
    config = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=50)
    # the cosine ends at decay_iters (a resumed run's first max_iters), whatever max_iters is now
    assert optim.learning_rate(0, config, 110) == pytest.approx(0.1)
    assert optim.learning_rate(9, config, 110) == pytest.approx(1.0)
    assert optim.learning_rate(60, config, 110) == pytest.approx(0.55)  # halfway down the cosine
    assert optim.learning_rate(110, config, 110) == pytest.approx(0.1)
    assert optim.learning_rate(500, config, 110) == pytest.approx(0.1)
    no_warmup = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=0)
    assert optim.learning_rate(0, no_warmup, 100) == pytest.approx(1.0)
    assert optim.learning_rate(50, no_warmup, 100) == pytest.approx(0.55)


@pytest.mark.exercise(2)
def test_cosine_decay_and_a_time_budget():
    config = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10)
    # the cosine alone: learning_rate at progress 0, min_lr at 1 and after
    assert optim.cosine_decay(0.0, config) == pytest.approx(1.0)
    assert optim.cosine_decay(0.25, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert optim.cosine_decay(0.5, config) == pytest.approx(0.55)
    assert optim.cosine_decay(1.0, config) == pytest.approx(0.1) and optim.cosine_decay(3.0, config) == pytest.approx(0.1)
    # under a budget the cosine follows the share spent, not the step; the rate is the smaller of warmup and cosine
    assert optim.learning_rate(500, config, 110, budget_spent=0.5) == pytest.approx(0.55)
    assert optim.learning_rate(4, config, 110, budget_spent=0.0) == pytest.approx(0.5)  # warmup: 5/10 of the rate
    assert optim.learning_rate(0, config, 110, budget_spent=0.5) == pytest.approx(0.1)  # warmup's 1/10 is smaller
    assert optim.learning_rate(4, config, 110, budget_spent=1.0) == pytest.approx(0.1)  # a budget ending in warmup


def uniform_model(vocab_size, block_size):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=block_size, vocab_size=vocab_size))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution
    return model


@pytest.mark.exercise(1)
def test_evaluate_uniform_byte_model_is_8_bits_per_byte():
    data = np.frombuffer(b"hello world, this is a test of eval" * 4, dtype=np.uint8)
    token_bytes = torch.ones(256, dtype=torch.long)
    result = train.evaluate(uniform_model(256, 8), data, token_bytes, block_size=8)
    assert result["val_loss"] == pytest.approx(math.log(256))
    assert result["val_bpb"] == pytest.approx(8.0)


@pytest.mark.exercise(1)
def test_evaluate_counts_the_bytes_of_each_predicted_token():
    # vocabulary of 3 tokens covering 1, 2 and 5 bytes; uniform predictions cost ln 3 nats each
    token_bytes = torch.tensor([1, 2, 5])
    data = np.array([0, 1, 2, 2, 1, 0, 1, 1, 2], dtype=np.uint16)  # windows of 4: targets are data[1:9]
    result = train.evaluate(uniform_model(3, 4), data, token_bytes, block_size=4)
    predicted_bytes = 2 + 5 + 5 + 2 + 1 + 2 + 2 + 5
    assert result["val_bpb"] == pytest.approx(8 * math.log(3) / (math.log(2) * predicted_bytes))


@pytest.mark.exercise(1)
def test_evaluate_scores_windows_a_block_apart_like_a_plain_loop():
    """Window w is tokens w * T .. w * T + T: each token after the first is predicted once, in eval mode."""
    torch.manual_seed(0)
    T, vocab = 8, 5
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=T, vocab_size=vocab, dropout=0.5)).double()
    token_bytes = torch.tensor([1, 2, 3, 1, 4])
    data = np.random.default_rng(0).integers(0, vocab, size=7 * T + 3).astype(np.uint16)  # 7 windows, 2 tokens over

    def plain_loop(n_windows):
        nats, n_bytes = 0.0, 0
        with torch.no_grad():
            for w in range(n_windows):
                x = torch.from_numpy(data[w * T:w * T + T].astype(np.int64))
                y = torch.from_numpy(data[w * T + 1:w * T + T + 1].astype(np.int64))
                nats += F.cross_entropy(model.eval()(x[None])[0][0], y, reduction="sum").item()
                n_bytes += token_bytes[y].sum().item()
        model.train()
        return nats / (n_windows * T), nats / (math.log(2) * n_bytes)

    # max_tokens asks for max_tokens // T windows, at least one, at most all; batch_size does not matter
    for max_tokens, batch_size, n_windows in [(0, 64, 7), (0, 3, 7), (20, 64, 2), (5, 2, 1), (10 ** 6, 4, 7)]:
        model.train()  # dropout would change every score: evaluate must switch it off, then switch it back
        result = train.evaluate(model, data, token_bytes, T, max_tokens=max_tokens, batch_size=batch_size)
        assert model.training
        loss, bpb = plain_loop(n_windows)
        # float64: sums in another order differ by about 1e-15 of their size
        assert result["val_loss"] == pytest.approx(loss, rel=1e-10)
        assert result["val_bpb"] == pytest.approx(bpb, rel=1e-10)


# ----------------------------------------------------------------------------
# training

def test_training_lowers_the_loss_and_logs(dataset, tmp_path):
    checkpoint = run_train(dataset, tmp_path, "--max_iters=60")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "val_bpb" in r]
    assert losses[0] > 5.0  # near ln 256 = 5.55: a uniform guess over bytes
    assert evals[-1]["val_loss"] < 2.6  # below half of that in 60 steps
    assert [r["step"] for r in evals] == [10, 20, 30, 40, 50, 60]
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert checkpoint["step"] == 60 and checkpoint["data_meta"]["tokenization"] == "bytes"


def signal_at_call(n, signum, calls):
    """A loss_fn that sends signum to this process during its n-th call: mid-step, as a real signal arrives."""
    def loss_fn(model, x, y):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return train.language_model_loss(model, x, y)
    return loss_fn


@pytest.mark.parametrize("optimizer", optim.OPTIMIZERS)
def test_resume_matches_an_uninterrupted_run(dataset, tmp_path, optimizer):
    args = ["--max_iters=30", "--dropout=0.1", "--optimizer=" + optimizer]
    straight = run_train(dataset, tmp_path / "straight", *args)
    # the same run stopped by SIGTERM at step 15, then resumed
    config, model_config, _ = train.configure(["--dataset=" + dataset, "--out_dir=" + str(tmp_path / "split"),
                                               *TINY, *args])
    _, device, data, model, optimizer, state = train.setup(config, model_config)
    with pytest.raises(SystemExit):
        train.train_loop(model, optimizer, data, config, state, device,
                         loss_fn=signal_at_call(15, signal.SIGTERM, []))
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 15
    train.main(["--out_dir=" + str(tmp_path / "split"), "--resume", "--threads=1"])
    resumed = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert resumed["step"] == 30
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_next_step_boundary(dataset, tmp_path, signum):
    """Ctrl-C or SIGTERM in the middle of step 8 lets that step finish, then saves it: never half a step."""
    config, model_config, _ = train.configure(["--dataset=" + dataset, "--out_dir=" + str(tmp_path), *TINY])
    _, device, data, model, optimizer, state = train.setup(config, model_config)
    before = signal.getsignal(signum)  # the default, or SIG_IGN when the suite runs as a background job
    with pytest.raises(SystemExit) as stopped:
        train.train_loop(model, optimizer, data, config, state, "cpu", loss_fn=signal_at_call(8, signum, []))
    assert stopped.value.code == 128 + signum
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 8
    assert before is not None and signal.getsignal(signum) == before  # handlers restored


def test_a_second_ctrl_c_stops_at_once_without_saving(dataset, tmp_path, capsys):
    """Ctrl-C twice in step 15: no step finishes, nothing is saved, the step-10 checkpoint is named."""
    config, model_config, _ = train.configure(["--dataset=" + dataset, "--out_dir=" + str(tmp_path), *TINY,
                                               "--max_iters=30"])
    _, device, data, model, optimizer, state = train.setup(config, model_config)
    calls = []

    def ctrl_c_twice(model, x, y):
        calls.append(1)
        if len(calls) == 15:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return train.language_model_loss(model, x, y)

    with pytest.raises(SystemExit) as stopped:
        train.train_loop(model, optimizer, data, config, state, device, loss_fn=ctrl_c_twice)
    assert stopped.value.code == 130 and state.step == 14
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 10
    assert f"stopped without saving; the last checkpoint: {tmp_path / 'ckpt.pt'}, step 10" in capsys.readouterr().out
    assert state.lock is None  # the loop's end let go of the folder, however it ended


# ----------------------------------------------------------------------------
# bad input: one clear line, never a traceback

def test_corpus_shorter_than_the_context(tmp_path):
    text = tmp_path / "short.txt"
    text.write_bytes(b"just a few bytes of text here\n" * 2)
    folder = prepare.prepare(prepare.PrepareConfig(input=str(text), data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="fewer than the context"):
        train.load_dataset(str(folder), block_size=64)


def test_missing_dataset(tmp_path):
    with pytest.raises(UserError, match="data/prepare.py"):
        train.load_dataset(str(tmp_path / "nothing"), block_size=8)


def test_resume_refuses_damaged_checkpoints(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="not a torch checkpoint file"):
        train.configure(["--resume", "--out_dir=" + str(tmp_path), "--threads=1"])


@pytest.mark.parametrize("args, message", [
    (["train.py", "--batch_sise=4"], "did you mean --batch_size"),
    (["train.py", "--dataset=no_such_data", "--out_dir=out-never-written"], "run python data/prepare.py"),
    (["train.py", "--resume", "--out_dir=no_such_run"], "no run to resume in no_such_run"),
    (["sample.py", "--ckpt=FOREIGN"], "not a checkpoint written by this project"),
    (["data/prepare.py", "--input=EMPTY"], "is empty"),
])
def test_scripts_print_one_line_errors(tmp_path, args, message):
    foreign, empty = tmp_path / "foreign.pt", tmp_path / "empty.txt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    empty.write_bytes(b"")
    args = [a.replace("FOREIGN", str(foreign)).replace("EMPTY", str(empty)) for a in args]
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


# ----------------------------------------------------------------------------
# end to end, as a user runs it

def test_prepare_train_sample_end_to_end(tmp_path, corpus_text):
    (tmp_path / "tiny.txt").write_bytes(corpus_text)
    commands = [
        ["data/prepare.py", f"--input={tmp_path / 'tiny.txt'}", f"--data_dir={tmp_path}"],
        ["train.py", f"--dataset={tmp_path / 'tiny_bytes'}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=40"],
        ["sample.py", f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", "--prompt=the ", "--max_new_tokens=40", "--threads=1"],
    ]
    outputs = [subprocess.run([sys.executable, *c], cwd=ROOT, capture_output=True, text=True) for c in commands]
    for command, result in zip(commands, outputs):
        assert result.returncode == 0, (command, result.stderr[-2000:])
    assert "bits per byte" in outputs[1].stdout
    sample, stats = outputs[2].stdout, outputs[2].stderr
    assert sample.startswith("the ") and len(sample) > 20
    assert "tokens/s" in stats


def test_clipping_covers_every_parameter_the_optimizer_trains(dataset, tmp_path, monkeypatch):
    """distill.py trains a projection beside the model: its gradients must be clipped with the model's."""
    config, model_config, _ = train.configure(["--dataset=" + dataset, *TINY, "--max_iters=1", "--eval_interval=1"])
    _, device, data, model, _, state = train.setup(config, model_config)
    extra = torch.nn.Linear(4, 4)
    optimizer = optim.make_optimizer(torch.nn.ModuleList([model, extra]), config, device)
    clipped = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, **options: clipped.extend(params))
    monkeypatch.setattr(train, "save_checkpoint", lambda *args: None)
    config.out_dir = str(tmp_path / "out")
    train.train_loop(model, optimizer, data, config, state, device)
    assert {id(p) for p in extra.parameters()} <= {id(p) for p in clipped}
    assert {id(p) for p in model.parameters()} <= {id(p) for p in clipped}


@pytest.mark.exercise(14)
def test_accumulated_gradients_are_the_mean_over_micro_batches_drawn_from_their_seeds():
    config = train.TrainConfig(batch_size=3, grad_accum=4, seed=7)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, dropout=0.2)).double()
    twin = copy.deepcopy(model)
    data = np.random.default_rng(0).integers(0, 11, size=200).astype(np.uint16)
    state = train.TrainState(decay_iters=100, step=5)

    def loss_fn(model, x, y):  # train.py's loss, and an extra metric to be summed beside it
        loss, _ = train.language_model_loss(model, x, y)
        return loss, {"twice": 2 * loss}

    model.train(), twin.train()
    totals = train.accumulate_gradients(model, 8, SimpleNamespace(train=data), config, state, "cpu",
                                        train.Distributed(), loss_fn, train.get_batch, contextlib.nullcontext())
    # the reference: micro-batch i of step s is drawn, and its dropout seeded, from micro_batch_seed(seed, s, i);
    # the step's gradient is that of the mean of the micro-batches' mean losses
    losses = []
    for i in range(4):
        seed = train.micro_batch_seed(7, 5, i)
        x, y = train.get_batch(data, 3, 8, torch.Generator().manual_seed(seed), "cpu")
        torch.manual_seed(seed)
        losses.append(twin(x, y)[1])
    torch.stack(losses).mean().backward()
    # float64: the same sum in another order, about 1e-16 of each gradient apart; a wrong batch or scale, 1e-2
    for ours, reference in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, atol=1e-12, rtol=0)
    total = sum(loss.item() for loss in losses)
    assert set(totals) == {"loss", "twice"}
    assert totals["loss"].item() == pytest.approx(total, rel=1e-6)  # summed, in float32
    assert totals["twice"].item() == pytest.approx(2 * total, rel=1e-6)


# ----------------------------------------------------------------------------
# Muon and the time budget

def test_muon_gets_exactly_the_core_matrices():
    config = train.TrainConfig(optimizer="muon")
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=True))
    adamw, muon = optim.make_optimizer(model, config, "cpu").optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in (*adamw.param_groups, *muon.param_groups)]
    core_matrices = [f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "ffn.c_fc", "ffn.c_proj")]
    assert groups[0] == ["wte.weight", "wpe.weight"]  # AdamW, decayed; the tied head is wte
    assert groups[1] == [f"h.{i}.{m}" for i in range(2) for m in (  # AdamW, not decayed
        "ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
        "ffn.c_fc.bias", "ffn.c_proj.bias")] + ["ln_f.weight", "ln_f.bias"]
    assert [name for group in groups[2:] for name in group] == core_matrices  # Muon, one matrix per group
    assert [g.get("row_blocks") for g in muon.param_groups] == [[32, 32, 32], None, None, None] * 2
    assert all(g["lr_scale"] == config.muon_lr / config.learning_rate for g in muon.param_groups)


def test_muon_gets_a_pooled_models_byte_layer_matrices_too():
    # measured: with the byte layers under AdamW a pooled model learned far slower than a bytes model per step
    config = train.TrainConfig(optimizer="muon")
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, embedder="pooled", byte_width=16))
    adamw, muon = optim.make_optimizer(model, config, "cpu").optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    on_muon = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    byte_matrices = [f"pooled.{layers}.{i}.{m}.weight" for layers in ("layers_in", "layers_out") for i in (0, 1)
                     for m in ("qkv", "attn_out", "fc", "proj")]
    assert sorted(on_muon) == sorted(byte_matrices + ["pooled.up.weight", "pooled.down.weight"]
                                     + [f"h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "ffn.c_fc", "ffn.c_proj")])
    ngram_tables = [f"pooled.ngram.tables.{i}.weight" for i in range(3)]  # on by default for pooled models
    assert [names[id(p)] for p in adamw.param_groups[0]["params"]] == ["pooled.byte_embedding.weight", *ngram_tables,
                                                                      "pooled.position.weight", "wpe.weight"]  # tables; the head is tied
    blocks = {names[id(g["params"][0])]: g.get("row_blocks") for g in muon.param_groups}
    assert blocks["pooled.layers_in.0.qkv.weight"] == [16, 16, 16] and blocks["h.0.attn.c_attn.weight"] == [32, 32, 32]


@pytest.mark.exercise(8)
def test_muon_step_equals_torch_muon_on_separate_q_k_v():
    # our Muon with bf16 Newton-Schulz is torch.optim.Muon's arithmetic, with the fused q/k/v
    # matrix orthogonalized as three separate matrices: torch's Muon on three parameters is the reference
    torch.manual_seed(0)
    fused = torch.randn(96, 32, requires_grad=True)
    parts = [p.detach().clone().requires_grad_() for p in fused.detach().split(32)]
    ours = optim.Muon([{"params": [fused], "row_blocks": [32, 32, 32]}], ns_dtype=torch.bfloat16, lr=0.05)
    reference = torch.optim.Muon(parts, lr=0.05)
    for _ in range(3):  # momentum carries over steps
        grad = torch.randn(96, 32)
        fused.grad = grad.clone()
        for part, g in zip(parts, grad.split(32)):
            part.grad = g.clone()
        ours.step()
        reference.step()
    # ours runs q, k and v as one batch, which may sum in another order than torch's one matrix at a time:
    # within bf16's rounding, the bound of the float32 comparison below (orthogonalizing the fused matrix
    # whole would move every entry by about lr)
    assert (fused.detach() - torch.cat([p.detach() for p in parts])).abs().max() < 0.05 * 0.02
    # float32 Newton-Schulz (the default where bf16 is not native) lands near the bf16 one
    single = torch.randn(64, 32, requires_grad=True)
    twin = single.detach().clone().requires_grad_()
    single.grad, twin.grad = torch.ones(64, 32).tril(), torch.ones(64, 32).tril()
    optim.Muon([single], lr=0.05).step()
    torch.optim.Muon([twin], lr=0.05).step()
    assert (single - twin).abs().max() < 0.05 * 0.02  # bf16's relative error on a step of size lr


@pytest.mark.exercise(8)
def test_newton_schulz_in_one_batch_equals_one_matrix_at_a_time():
    # float64: the batched and the single matmuls then agree to about 1e-15 whatever order they sum in
    updates = torch.randn(3, 24, 40, dtype=torch.float64)
    batched = optim.orthogonalize(updates, 5, torch.float64)
    for update, result in zip(updates, batched):
        torch.testing.assert_close(result, optim.orthogonalize(update[None], 5, torch.float64)[0], atol=1e-12, rtol=0)
    # a list of mixed shapes (tall ones too) comes back in its order, each as orthogonalized alone
    mixed = [torch.randn(24, 40, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64), updates[0]]
    for update, result in zip(mixed, optim.orthogonalize_all(mixed, [5, 5, 5], torch.float64)):
        torch.testing.assert_close(result, optim.orthogonalize(update[None], 5, torch.float64)[0], atol=1e-12, rtol=0)
    # the iteration's purpose: singular values in about [0.5, 1.5]
    singular = torch.linalg.svdvals(batched)
    assert singular.min() > 0.5 and singular.max() < 1.5


@pytest.mark.parametrize("native", [True, False])
def test_newton_schulz_runs_in_bf16_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(optim, "native_bf16", lambda device: native)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    _, muon = optim.make_optimizer(model, train.TrainConfig(optimizer="muon"), "cpu").optimizers
    assert muon.ns_dtype == (torch.bfloat16 if native else torch.float32)
def newton_schulz(update, steps):
    """The quintic iteration as Keller Jordan's post writes it, in float64, for a wide or square matrix."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.double() / max(update.double().norm(), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


@pytest.mark.exercise(8)
def test_orthogonalize_is_newton_schulz_either_way_round():
    torch.manual_seed(0)
    wide = torch.randn(16, 48, dtype=torch.float64)
    out = optim.orthogonalize(wide[None], 5, torch.float64)[0]
    # float64 on values of order 1 through five iterations: about 1e-15 apart; a wrong coefficient, 1e-2
    torch.testing.assert_close(out, newton_schulz(wide, 5), atol=1e-12, rtol=0)
    # every singular value lands near 1 (about 0.68 to 1.13 after five steps, by the coefficients' design)
    singular = torch.linalg.svdvals(out)
    assert 0.6 < singular.min() and singular.max() < 1.2
    # a tall matrix iterates as its wide transpose: the same operations, so the same numbers
    assert torch.equal(optim.orthogonalize(wide.T[None], 5, torch.float64)[0], out.T)
    # the scale of an update does not matter, a zero one stays zero, and the result has the update's dtype
    torch.testing.assert_close(optim.orthogonalize(1000 * wide[None], 5, torch.float64)[0], out, atol=1e-12, rtol=0)
    assert torch.equal(optim.orthogonalize(torch.zeros(1, 4, 6), 5, torch.float64), torch.zeros(1, 4, 6))
    single = optim.orthogonalize(wide.float()[None], 5, torch.float64)  # computed in float64, returned in float32
    assert single.dtype == torch.float32
    assert torch.equal(single, optim.orthogonalize(wide.float().double()[None], 5, torch.float64).float())


def test_time_budget_stops_within_one_step_and_ends_at_min_lr(dataset, tmp_path, monkeypatch):
    clock = {"now": 100.0}
    step_seconds = 0.25

    def slow_loss(model, x, y):  # every training step takes exactly step_seconds on this clock
        clock["now"] += step_seconds
        return train.language_model_loss(model, x, y)

    monkeypatch.setattr(train.time, "perf_counter", lambda: clock["now"])
    config, model_config, _ = train.configure(["--dataset=" + dataset, "--out_dir=" + str(tmp_path), *TINY,
                                               "--max_seconds=3", "--log_interval=1", "--warmup_iters=2",
                                               "--max_iters=5"])  # max_iters is ignored under a budget
    data = train.load_dataset(config.dataset, model_config.block_size)
    model_config.vocab_size = data.meta["vocab_size"]
    model = GPT(model_config)
    state = train.TrainState(decay_iters=config.max_iters)
    train.train_loop(model, optim.make_optimizer(model, config, "cpu"), data, config, state, "cpu", loss_fn=slow_loss)
    assert state.step == 12 and state.seconds == pytest.approx(3.0)  # 12 steps of 0.25 s fill the 3 s exactly
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert len(lrs) == 12 and lrs[-1] == config.min_lr and lrs[-2] > config.min_lr
    # step 2 starts after 1 step of 0.25 s and is predicted to end at 0.5 s: a sixth of the budget
    cosine = config.min_lr + (config.learning_rate - config.min_lr) * 0.5 * (1 + math.cos(math.pi / 6))
    assert lrs[:2] == [config.learning_rate / 2, pytest.approx(cosine)]  # warmup, then the cosine over time


def test_a_cpu_time_budget_does_not_count_waiting():
    """--budget_clock=cpu counts this process's CPU time: waiting while other programs run costs nothing."""
    wall, cpu = optim.TimeBudget(10.0, clock="wall"), optim.TimeBudget(10.0, clock="cpu")
    time.sleep(0.3)
    assert wall.tick() >= 0.3 and cpu.tick() < 0.1
    # working: the CPU clock runs, however slowly a shared core lets it (a wall-clock loop may get
    # almost no CPU on a busy machine, so the loop waits for this process's own CPU time instead)
    start = time.process_time()
    while time.process_time() - start < 0.1:
        pass
    assert cpu.tick() >= 0.1


def test_compiled_training_equals_eager(dataset, tmp_path, monkeypatch):
    """Tolerance: float32 reassociation in fused kernels, 1e-4."""
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler (cc or gcc), and none is installed")
    # float32 Newton-Schulz on every CPU: in bf16 (where it is native) a 1e-6 difference in a gradient can
    # flip a rounding of Muon's update, 2**-8 of a step, more than reassociation moves anything
    monkeypatch.setattr(optim, "native_bf16", lambda device: False)
    eager = run_train(dataset, tmp_path / "eager", "--max_iters=3", "--ffn=relu2", "--qk_norm=true", "--optimizer=muon")
    compiled = run_train(dataset, tmp_path / "compiled", "--max_iters=3", "--ffn=relu2", "--qk_norm=true",
                         "--optimizer=muon", "--compile=true")
    for name, tensor in eager["model"].items():
        torch.testing.assert_close(compiled["model"][name], tensor, atol=1e-4, rtol=1e-4, msg=name)


def test_memory_estimate_bounds_a_real_training_step():
    """The estimate is an upper bound: the parameters and Adam state alone, counted exactly, fit under it."""
    config = preset_config("cpu-tiny")
    params = GPT(config).num_params()["total"]
    estimate = train.training_memory_bytes(config, batch_size=12)
    # above weights + grads + 2 moments, far below a machine's memory
    assert 4 * 4 * params < estimate["parameters"] and sum(estimate.values()) < 2**28
    # activations grow with the tokens of a batch: 8x the context, 8x the activations
    longer = train.training_memory_bytes(preset_config("cpu-tiny", block_size=8 * config.block_size), 12)
    assert longer["activations"] == 8 * estimate["activations"]


# ----------------------------------------------------------------------------
# data: a split's shards, read as one stream of tokens

def test_a_token_stream_reads_its_shards_as_one_array(tmp_path):
    reference = np.random.default_rng(0).integers(0, 50257, 1000).astype(np.uint16)
    bounds = [0, 100, 101, 500, 1000]  # a one-token shard, and slices that cross two or three shards
    paths = [tmp_path / f"{i}.bin" for i in range(len(bounds) - 1)]
    for path, start, stop in zip(paths, bounds, bounds[1:]):
        reference[start:stop].tofile(path)
    stream = train.TokenStream(paths, "uint16")
    assert len(stream) == 1000 and np.array_equal(np.asarray(stream), reference)
    for index in (slice(None), slice(5, 300), slice(99, 102), slice(-10, None), slice(0, 1000, 7), slice(600, 400),
                  5, -1, 100, 101):
        assert np.array_equal(stream[index], reference[index]), index
    windows = np.random.default_rng(1).integers(0, 990, 64)[:, None] + np.arange(11)
    assert np.array_equal(stream[windows], reference[windows])
    with pytest.raises(IndexError):
        stream[np.array([3, 1000])]


def prepare_twice(tmp_path, corpus_text, monkeypatch):
    """corpus_text prepared as one file per split and as shards of 500 tokens: the two folders."""
    (tmp_path / "c.txt").write_bytes(corpus_text)
    monkeypatch.setattr(prepare, "PIECE_BYTES", 256)  # shards close between pieces
    one = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "c.txt"), data_dir=str(tmp_path), name="one"))
    monkeypatch.setattr(prepare, "SHARD_TOKENS", 500)
    many = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "c.txt"), data_dir=str(tmp_path), name="many"))
    return str(one), str(many)


def test_shards_give_the_batches_and_the_run_of_one_file(tmp_path, corpus_text, monkeypatch):
    one, many = prepare_twice(tmp_path, corpus_text, monkeypatch)
    whole, sharded = train.load_dataset(one, 16), train.load_dataset(many, 16)
    assert len(sharded.meta["shards"]["train"]) > 30 and len(sharded.meta["shards"]["val"]) > 2
    # about 3% of 17-token windows cross one of the boundaries, about 550 tokens apart: 800 windows cross some
    for seed in range(100):
        x, y = train.get_batch(whole.train, 8, 16, torch.Generator().manual_seed(seed), "cpu")
        x_sharded, y_sharded = train.get_batch(sharded.train, 8, 16, torch.Generator().manual_seed(seed), "cpu")
        assert torch.equal(x, x_sharded) and torch.equal(y, y_sharded)
    # evaluation's consecutive windows cross every boundary of the validation shards
    model = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    assert train.evaluate(model, whole.val, whole.token_bytes, 16) == \
        train.evaluate(model, sharded.val, sharded.token_bytes, 16)
    # and a whole run: the same weights
    ones, manys = run_train(one, tmp_path / "one_run", "--max_iters=10"), run_train(many, tmp_path / "many_run",
                                                                                   "--max_iters=10")
    for name, tensor in ones["model"].items():
        assert torch.equal(tensor, manys["model"][name]), name


@pytest.mark.parametrize("damage, message", [
    ("old", "prepared by an older data/prepare.py .*: run python data/prepare.py again"),
    ("missing", "train_0003.bin is missing, but meta.json says .*: run python data/prepare.py again"),
    ("short", "train_0003.bin holds 10 bytes, but meta.json says"),
])
def test_damaged_or_old_data_is_one_line(tmp_path, corpus_text, monkeypatch, damage, message):
    _, many = prepare_twice(tmp_path, corpus_text, monkeypatch)
    folder = Path(many)
    if damage == "old":  # the layout before shards: train.bin and val.bin, and no shard list
        meta = json.loads((folder / "meta.json").read_text())
        del meta["shards"]
        (folder / "meta.json").write_text(json.dumps(meta))
    elif damage == "missing":
        (folder / "train_0003.bin").unlink()
    else:
        with open(folder / "train_0003.bin", "r+b") as f:
            f.truncate(10)
    with pytest.raises(UserError, match=message):
        train.load_dataset(many, 16)
