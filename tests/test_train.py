"""train.py: configuration, data, bits per byte, the loop, checkpoints and resume."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

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
    for key in list(train.TrainConfig.__dataclass_fields__) + list(GPTConfig.__dataclass_fields__):
        assert f"--{key} " in result.stdout
    # model defaults are the default preset's, not GPTConfig's
    default_preset = preset_config(train.TrainConfig.preset)
    for key in ("n_layer", "n_embd", "block_size", "ffn", "qk_norm"):
        assert re.search(rf"--{key} \S+ +default: {re.escape(repr(getattr(default_preset, key)))}\n", result.stdout), key


# ----------------------------------------------------------------------------
# learning rate, bits per byte

def test_learning_rate_schedule():
    config = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert train.learning_rate(0, config) == pytest.approx(0.1)
    assert train.learning_rate(9, config) == pytest.approx(1.0)
    assert train.learning_rate(60, config) == pytest.approx(0.55)  # halfway down the cosine
    assert train.learning_rate(110, config) == pytest.approx(0.1)
    assert train.learning_rate(500, config) == pytest.approx(0.1)


def uniform_model(vocab_size, block_size):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=block_size, vocab_size=vocab_size))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution
    return model


def test_evaluate_uniform_byte_model_is_8_bits_per_byte():
    data = np.frombuffer(b"hello world, this is a test of eval" * 4, dtype=np.uint8)
    token_bytes = torch.ones(256, dtype=torch.long)
    result = train.evaluate(uniform_model(256, 8), data, token_bytes, block_size=8)
    assert result["val_loss"] == pytest.approx(math.log(256))
    assert result["val_bpb"] == pytest.approx(8.0)


def test_evaluate_counts_the_bytes_of_each_predicted_token():
    # vocabulary of 3 tokens covering 1, 2 and 5 bytes; uniform predictions cost ln 3 nats each
    token_bytes = torch.tensor([1, 2, 5])
    data = np.array([0, 1, 2, 2, 1, 0, 1, 1, 2], dtype=np.uint16)  # windows of 4: targets are data[1:9]
    result = train.evaluate(uniform_model(3, 4), data, token_bytes, block_size=4)
    predicted_bytes = 2 + 5 + 5 + 2 + 1 + 2 + 2 + 5
    assert result["val_bpb"] == pytest.approx(8 * math.log(3) / (math.log(2) * predicted_bytes))


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


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
def test_resume_matches_an_uninterrupted_run(dataset, tmp_path, optimizer):
    straight = run_train(dataset, tmp_path / "straight", "--max_iters=30", "--dropout=0.1", "--optimizer=" + optimizer)
    # the same schedule (decay over 30 steps), stopped at 15 and resumed
    run_train(dataset, tmp_path / "split", "--max_iters=15", "--lr_decay_iters=30", "--dropout=0.1",
              "--optimizer=" + optimizer)
    train.main(["--out_dir=" + str(tmp_path / "split"), "--resume", "--max_iters=30", "--threads=1"])
    resumed = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert resumed["step"] == 30
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_next_step_boundary(dataset, tmp_path, signum):
    """Ctrl-C or SIGTERM in the middle of step 8 lets that step finish, then saves it: never half a step."""
    calls = []

    def signalling_loss(model, x, y):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signum)  # arrives mid-step, as a real one would
        return train.language_model_loss(model, x, y)

    config, model_config, _ = train.configure(["--dataset=" + dataset, "--out_dir=" + str(tmp_path), *TINY])
    _, device, data, model, optimizer, state = train.setup(config, model_config)
    before = signal.getsignal(signum)  # the default, or SIG_IGN when the suite runs as a background job
    with pytest.raises(SystemExit) as stopped:
        train.train_loop(model, optimizer, data, config, state, "cpu", loss_fn=signalling_loss)
    assert stopped.value.code == 128 + signum
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 8
    assert before is not None and signal.getsignal(signum) == before  # handlers restored


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


def test_resume_refuses_model_keys_and_damaged_checkpoints(tmp_path):
    with pytest.raises(UserError, match="drop --n_layer"):
        train.configure(["--resume", "--n_layer=3", "--out_dir=" + str(tmp_path), "--threads=1"])
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        train.configure(["--resume", "--out_dir=" + str(tmp_path), "--threads=1"])


@pytest.mark.parametrize("args, message", [
    (["train.py", "--batch_sise=4"], "did you mean --batch_size"),
    (["train.py", "--dataset=no_such_data", "--out_dir=out-never-written"], "run python data/prepare.py"),
    (["train.py", "--resume", "--out_dir=no_such_run"], "no checkpoint"),
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
    optimizer = train.make_optimizer(torch.nn.ModuleList([model, extra]), config, device)
    clipped = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, **options: clipped.extend(params))
    monkeypatch.setattr(train, "save_checkpoint", lambda *args: None)
    config.out_dir = str(tmp_path / "out")
    train.train_loop(model, optimizer, data, config, state, device)
    assert {id(p) for p in extra.parameters()} <= {id(p) for p in clipped}
    assert {id(p) for p in model.parameters()} <= {id(p) for p in clipped}


# ----------------------------------------------------------------------------
# Muon and the time budget

def test_muon_gets_exactly_the_core_matrices():
    config = train.TrainConfig(optimizer="muon")
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=True))
    adamw, muon = train.make_optimizer(model, config, "cpu").optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in (*adamw.param_groups, *muon.param_groups)]
    core_matrices = [f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert groups[0] == ["wte.weight", "wpe.weight"]  # AdamW, decayed; the tied head is wte
    assert groups[1] == [f"h.{i}.{m}" for i in range(2) for m in (  # AdamW, not decayed
        "ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
        "mlp.c_fc.bias", "mlp.c_proj.bias")] + ["ln_f.weight", "ln_f.bias"]
    assert [name for group in groups[2:] for name in group] == core_matrices  # Muon, one matrix per group
    assert [g.get("row_blocks") for g in muon.param_groups] == [[32, 32, 32], None, None, None] * 2
    assert all(g["lr_scale"] == config.muon_lr / config.learning_rate for g in muon.param_groups)


def test_muon_gets_a_pooled_models_byte_layer_matrices_too():
    # measured: with the byte layers under AdamW a pooled model learned far slower than a bytes model per step
    config = train.TrainConfig(optimizer="muon")
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, embedder="pooled", byte_width=16,
                          byte_layers_in=1, byte_layers_out=1))
    adamw, muon = train.make_optimizer(model, config, "cpu").optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    on_muon = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    byte_matrices = [f"wte.{layers}.0.{m}.weight" for layers in ("layers_in", "layers_out")
                     for m in ("qkv", "attn_out", "fc", "proj")]
    assert sorted(on_muon) == sorted(byte_matrices + ["wte.up.weight", "wte.down.weight"]
                                     + [f"h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")])
    assert [names[id(p)] for p in adamw.param_groups[0]["params"]] == ["wte.byte_embedding.weight", "wte.position.weight",
                                                                      "wpe.weight"]  # tables; the head is tied
    blocks = {names[id(g["params"][0])]: g.get("row_blocks") for g in muon.param_groups}
    assert blocks["wte.layers_in.0.qkv.weight"] == [16, 16, 16] and blocks["h.0.attn.c_attn.weight"] == [32, 32, 32]


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
    assert torch.equal(fused.detach(), torch.cat([p.detach() for p in parts]))
    # float32 Newton-Schulz (the CPU default) lands near the bf16 one
    single = torch.randn(64, 32, requires_grad=True)
    twin = single.detach().clone().requires_grad_()
    single.grad, twin.grad = torch.ones(64, 32).tril(), torch.ones(64, 32).tril()
    optim.Muon([single], lr=0.05).step()
    torch.optim.Muon([twin], lr=0.05).step()
    assert (single - twin).abs().max() < 0.05 * 0.02  # bf16's relative error on a step of size lr


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
    state = train.TrainState()
    train.train_loop(model, train.make_optimizer(model, config, "cpu"), data, config, state, "cpu", loss_fn=slow_loss)
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
    busy = time.perf_counter() + 0.3
    while time.perf_counter() < busy:  # working: the CPU clock runs (a little slower if the core is shared)
        pass
    assert cpu.tick() > 0.05


def test_compiled_training_and_decoding_equal_eager(dataset, tmp_path):
    """One test for both: compiling is slow. Tolerance: float32 reassociation in fused kernels, 1e-4."""
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler (cc or gcc), and none is installed")
    eager = run_train(dataset, tmp_path / "eager", "--max_iters=3", "--ffn=relu2", "--qk_norm=true", "--optimizer=muon")
    compiled = run_train(dataset, tmp_path / "compiled", "--max_iters=3", "--ffn=relu2", "--qk_norm=true",
                         "--optimizer=muon", "--compile=true")
    for name, tensor in eager["model"].items():
        torch.testing.assert_close(compiled["model"][name], tensor, atol=1e-4, rtol=1e-4, msg=name)
    model = GPT(GPTConfig(**eager["model_config"])).eval()
    model.load_state_dict(eager["model"])
    prompt = torch.tensor([[1, 2, 3]])
    # 40 tokens pass the 16-token context twice: prefills and refills stay eager, each single step is compiled
    assert torch.equal(model.generate(prompt, 40, temperature=0, compile=True), model.generate(prompt, 40, temperature=0))
