"""Data-parallel training with torchrun: 2 CPU processes over gloo, on loopback, against 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from cli import UserError
from data import prepare
from model import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_TIMEOUT_S = 180  # a hung rendezvous fails the test instead of the whole suite
# the same global batch either way: 2 micro-batches of 4 per step, split over however many processes
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--grad_accum=2",
        "--eval_interval=10", "--eval_tokens=512", "--log_interval=5", "--warmup_iters=5", "--threads=1",
        "--max_iters=20", "--dropout=0.1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    text = folder / "tiny.txt"
    text.write_bytes(b"".join(b"line %d of a small corpus for data parallel tests\n" % i for i in range(800)))
    return str(prepare.prepare(prepare.PrepareConfig(input=str(text), data_dir=str(folder))))


def launch(args, processes):
    """Run train.py in 1 process, or under torchrun in several on this machine only."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=TORCHRUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    one = launch([f"--dataset={dataset}", f"--out_dir={out / 'one'}", *TINY], processes=1)
    two = launch([f"--dataset={dataset}", f"--out_dir={out / 'two'}", *TINY], processes=2)
    return out, one, two


def test_two_processes_follow_the_single_process_loss_curve(runs):
    out, _, _ = runs
    single, double = metrics(out / "one"), metrics(out / "two")
    assert [r["step"] for r in single] == [r["step"] for r in double]
    for a, b in zip(single, double):
        for key in ("loss", "val_loss", "val_bpb"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    weights_one = load_checkpoint(out / "one" / "ckpt.pt")["model"]
    weights_two = load_checkpoint(out / "two" / "ckpt.pt")["model"]
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-5, atol=1e-6)


def test_only_the_main_process_logs_and_writes(runs):
    out, _, two = runs
    steps = [(r["step"], "val_bpb" in r) for r in metrics(out / "two")]
    assert len(steps) == len(set(steps))  # a second writer would duplicate every line
    assert two.stdout.count("done in") == 1 and two.stdout.count("step 20: val loss") == 1
    assert sorted(p.name for p in (out / "two").iterdir()) == ["ckpt.pt", "metrics.jsonl", train.LOCK_NAME]


def test_two_process_checkpoint_resumes_in_one_process(runs, dataset):
    out, _, _ = runs
    # continue both runs from step 20 to 30 in a single process: same data, same result
    for name in ("one", "two"):
        launch([f"--out_dir={out / name}", "--resume", "--max_iters=30", "--threads=1"], processes=1)
    resumed_one = load_checkpoint(out / "one" / "ckpt.pt")
    resumed_two = load_checkpoint(out / "two" / "ckpt.pt")
    assert resumed_one["step"] == resumed_two["step"] == 30
    for name, tensor in resumed_one["model"].items():
        torch.testing.assert_close(resumed_two["model"][name], tensor, rtol=1e-5, atol=1e-6)


def test_micro_batches_must_divide_over_processes(monkeypatch, dataset):
    monkeypatch.setattr(train, "init_distributed", lambda device: train.Distributed(rank=0, world_size=2))
    config, model_config, _ = train.configure([f"--dataset={dataset}", "--grad_accum=3"])
    with pytest.raises(UserError, match="multiple of 2"):
        train.setup(config, model_config)
