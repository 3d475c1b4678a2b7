"""tools/gpu_check.py: its no-GPU path, and the commands and figures of its GPU path, checked on a CPU."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import bench
import train
from cli import parse_config
from tools import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_without_a_gpu_it_says_so_and_succeeds():
    result = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no CUDA GPU here (torch ") and result.stdout.endswith(": nothing to check\n")


def test_its_commands_are_ones_the_scripts_accept(tmp_path):
    """Every option of the GPU path's commands exists and is valid: a renamed flag fails here, not on the GPU."""
    config = gpu_check.GpuCheckConfig(out_dir=str(tmp_path))
    for processes in (1, 2):
        command = gpu_check.training_command(config, tmp_path / "data", tmp_path / "run", 2, processes)
        assert command.index("train.py") == (1 if processes == 1 else 5)
        train_config, model_config, _ = train.configure(command[command.index("train.py") + 1:])
        assert (train_config.max_iters, train_config.compile, train_config.grad_accum) == (50, True, 2)
        assert (train_config.device, model_config.n_embd) == ("cuda", 256)  # stlm-10m
    bench_config, shape = bench.BenchConfig(), bench.PresetShape()
    parse_config([bench_config, shape], gpu_check.bench_args(tmp_path))
    bench.check_options(bench_config)
    assert (bench_config.device, bench_config.cuda_graphs, bench_config.presets) == ("cuda", True, "stlm-10m")


def test_a_runs_figures_come_from_its_metrics(dataset, tmp_path):
    args = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--max_iters=12",
            "--log_interval=3", "--eval_interval=12", "--eval_tokens=256", "--threads=1"]
    train.main([f"--dataset={dataset}", f"--out_dir={tmp_path}", *args])
    records = [__import__("json").loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    figures = gpu_check.run_summary(tmp_path)
    assert figures["loss"] == [r["loss"] for r in records if "loss" in r][-1]
    assert (figures["step"], figures["val_bpb"]) == (12, records[-1]["val_bpb"])
    rates = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    assert rates[0] <= figures["tokens_per_s"] <= rates[-1]
    assert "; loss +0.0000 from 1 GPU's" == gpu_check.compare_runs(tmp_path, tmp_path)


def test_the_report_names_the_gpu_and_shows_failures(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 80 * 2**30}))
    results = [gpu_check.Result("bench.py, stlm-10m", [sys.executable, "bench.py", f"--out={ROOT}/b.json"], True, 3.0,
                                "tables below", "progress\ndevice cuda (Stand-in GPU)\n| a | b |\nwrote b.json\n"),
               gpu_check.Result("train", ["python", "train.py"], False, 2.0, "failed", "line 1\nTraceback: boom\n")]
    text = gpu_check.report(results, 2)
    assert text.splitlines()[0].startswith("GPU check, ") and "2 x Stand-in GPU, Stand-in GPU (80 GiB)" in text
    assert "| bench.py, stlm-10m | pass: tables below | 3 | `python bench.py --out=b.json` |" in text
    assert "\ndevice cuda (Stand-in GPU)\n| a | b |\n" in text and "wrote b.json" not in text
    assert "| train | **FAIL**: failed | 2 |" in text and text.endswith("Traceback: boom\n```")



def test_a_check_that_times_out_fails_with_what_it_wrote():
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    result = gpu_check.run_check("slow", command, timeout=3)
    assert not result.ok and result.summary == "failed"
    assert result.output.splitlines() == ["started", "timed out after 3 s"]
