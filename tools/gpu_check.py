"""
The GPU check: in one command, the CUDA paths that no CPU test reaches, with a report to paste into RESULTS.md.

    python tools/gpu_check.py                 # on every GPU this machine has
    python tools/gpu_check.py --steps=200     # longer training runs

Each check runs as its own process, with the command a maintainer would type:
1. the suite's GPU tests: generation with the KV cache on CUDA against the CPU and a full forward,
   and bench.py's CUDA timing (events and CUDA graphs) computing the model's own logits;
2. bench.py on CUDA: stlm-10m in bfloat16, with CUDA graphs;
3. --steps steps of stlm-10m with torch.compile (train.py autocasts to bf16 on CUDA);
4. the same run under torchrun over every GPU (NCCL), with the same global batch: it should
   follow the single-GPU run's loss (the data and dropout are seeded by step and micro-batch).
The data is the quick start's corpus as bytes (prepared offline if need be). Where no GPU is
present it says so and exits 0; where a check fails, its last lines follow the table.
"""

import datetime
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli import parse_config, run  # noqa: E402


@dataclass
class GpuCheckConfig:
    steps: int = 50  # training steps per run
    batch_size: int = 32  # per micro-batch; a run takes one micro-batch per GPU per step
    out_dir: str = "out-gpu-check"  # the data, runs and bench report
    timeout: int = 1200  # seconds one check may take (the first torch.compile takes a minute or two)


@dataclass
class Result:
    name: str
    command: list
    ok: bool
    seconds: float
    summary: str
    output: str


def run_check(name, command, timeout, summarize=lambda output: ""):
    """Run one check from the repository root; its summary is summarize(output) when it succeeds."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, ok = done.stdout + done.stderr, done.returncode == 0
    except subprocess.TimeoutExpired as e:
        # what a timed-out process wrote comes back as bytes, whatever text=True says
        written = [part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                   for part in (e.stdout, e.stderr)]
        output, ok = f"{''.join(written).rstrip()}\ntimed out after {timeout} s", False
    summary = "failed"
    if ok:
        # a check that ran but whose figures cannot be read still passed: say so rather than fail here
        try:
            summary = summarize(output)
        except (OSError, ValueError, KeyError, IndexError) as e:
            summary = f"ran; its figures could not be read ({type(e).__name__}: {e})"
    return Result(name, command, ok, time.perf_counter() - t0, summary, output)


def run_summary(out_dir):
    """A training run's figures from its metrics.jsonl: tokens/s after the first log line (compile) and the last evaluation."""
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    losses = [r["loss"] for r in records if "loss" in r]
    last = [r for r in records if "val_bpb" in r][-1]
    return {"tokens_per_s": statistics.median(rates), "loss": losses[-1], "val_bpb": last["val_bpb"],
            "step": last["step"]}


def describe_run(out_dir):
    figures = run_summary(out_dir)
    return (f"{figures['tokens_per_s']:,.0f} tokens/s; step {figures['step']}: loss {figures['loss']:.4f}, "
            f"val {figures['val_bpb']:.4f} bits per byte")


def pytest_summary(output):
    return output.strip().splitlines()[-1].strip("= ")


def bench_args(out):
    """bench.py's arguments: stlm-10m at its full context, in bf16, as CUDA graphs."""
    return ["--device=cuda", "--presets=stlm-10m", "--dtype=bfloat16", "--cuda_graphs", "--seq_lens=1,64,512",
            "--context_lens=1,64,512", "--train_len=0", "--train_batch=32", f"--out={out / 'bench.json'}"]


def training_command(config, data, out_dir, gpus, processes):
    """train.py on stlm-10m for config.steps steps: `gpus` micro-batches per step, over `processes` processes."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, "train.py", "--preset=stlm-10m", f"--dataset={data}", f"--out_dir={out_dir}", "--overwrite",
            "--device=cuda", "--compile", f"--max_iters={config.steps}", f"--eval_interval={config.steps}",
            f"--log_interval={max(1, config.steps // 5)}", f"--warmup_iters={max(1, config.steps // 5)}",
            f"--batch_size={config.batch_size}", f"--grad_accum={gpus}", "--eval_tokens=65536"]


def checks(config, gpus):
    """Every check, in order; each a Result."""
    out = Path(config.out_dir).resolve()
    python = sys.executable
    data = run_check("the quick start's data, as bytes",
                     [python, "data/prepare.py", f"--data_dir={out / 'data'}", "--name=bytes"], config.timeout)
    yield data
    yield run_check("GPU tests: KV cache, bench.py's CUDA timing",
                    [python, "-m", "pytest", "-q", "-rs", "tests/test_generation.py", "tests/test_bench.py",
                     "-k", "cuda"], config.timeout, pytest_summary)
    yield run_check("bench.py, stlm-10m, bfloat16, CUDA graphs", [python, "bench.py", *bench_args(out)],
                    config.timeout, lambda output: "tables below")
    if not data.ok:
        return
    dataset = out / "data" / "bytes"
    yield run_check(f"train.py stlm-10m, {config.steps} steps, bf16, compile, 1 GPU",
                    training_command(config, dataset, out / "run-1gpu", gpus, 1), config.timeout,
                    lambda output: describe_run(out / "run-1gpu"))
    yield run_check(f"the same under torchrun, {gpus} GPU{'s' * (gpus > 1)} (NCCL)"
                    + ("" if gpus > 1 else ": one process, no gradient all-reduce"),
                    training_command(config, dataset, out / "run-ddp", gpus, gpus), config.timeout,
                    lambda output: describe_run(out / "run-ddp") + compare_runs(out / "run-1gpu", out / "run-ddp"))


def compare_runs(single, ddp):
    """How far the DDP run's last loss is from the single-GPU run's (the same data; bf16 and reduction order differ)."""
    a, b = run_summary(single), run_summary(ddp)
    return f"; loss {b['loss'] - a['loss']:+.4f} from 1 GPU's"


def report(results, gpus):
    """The markdown to paste: the machine, a table of checks, bench.py's tables, and the output of any failure."""
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    lines = [f"GPU check, {datetime.date.today()}, commit {commit.stdout.strip() or 'unknown'}: {gpus} x {names} "
             f"({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}", "",
             "| check | result | seconds | command |", "|---|---|---:|---|"]
    for r in results:
        command = shlex.join(str(part).replace(sys.executable, "python").replace(f"{ROOT}/", "") for part in r.command)
        lines.append(f"| {r.name} | {'pass' if r.ok else '**FAIL**'}: {r.summary} | {r.seconds:.0f} | `{command}` |")
    for r in results:
        if r.ok and r.name.startswith("bench.py"):
            # its tables: from its "device ..." line to the "wrote ..." one
            output = r.output.splitlines()
            first = next((i for i, line in enumerate(output) if line.startswith("device ")), len(output))
            lines += ["", *itertools.takewhile(lambda line: not line.startswith("wrote "), output[first:])]
    for r in results:
        if not r.ok:
            lines += ["", f"{r.name} failed; its last lines:", "```", *r.output.strip().splitlines()[-25:], "```"]
    return "\n".join(lines)


def main(argv=None):
    config = GpuCheckConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    if not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): "
              "nothing to check")
        return
    gpus = torch.cuda.device_count()
    results = []
    for result in checks(config, gpus):
        print(f"{'pass' if result.ok else 'FAIL'} ({result.seconds:.0f} s): {result.name}", file=sys.stderr)
        results.append(result)
    print(report(results, gpus))
    if not all(r.ok for r in results):
        sys.exit(1)


if __name__ == "__main__":
    run(main)
