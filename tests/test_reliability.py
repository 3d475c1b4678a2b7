"""
The README's promise that the run folder is safe: no run is clobbered or silently wrong,
a kill at any moment resumes bit for bit, and every bad input gets one line
naming the problem and exit status 2, never a traceback.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import distill
import model as model_module
import sample
import tokenizer
import train
from cli import EXIT_USAGE, UserError, run
from conftest import TINY_TRAIN_ARGS as TINY
from data import prepare

ROOT = Path(__file__).resolve().parent.parent


def train_args(dataset, out_dir, *args):
    return ["--dataset=" + str(dataset), "--out_dir=" + str(out_dir), *TINY, *args]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A tiny byte-level run of 10 steps: its folder."""
    out = tmp_path_factory.mktemp("trained")
    train.main(train_args(dataset, out, "--max_iters=10"))
    return out


@pytest.fixture(scope="module")
def pooled_checkpoint(corpus_text, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pooled")
    (folder / "tiny.txt").write_bytes(corpus_text)
    data = prepare.prepare(prepare.PrepareConfig(input=str(folder / "tiny.txt"), data_dir=str(folder)))
    train.main(train_args(data, folder / "out", "--max_iters=2", "--eval_interval=2", "--embedder=pooled"))
    return folder / "out" / "ckpt.pt"


def one_line_error(capsys, main, argv):
    """Run a script's main as its command line would; return its one-line message, checking exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run(lambda: main(argv))
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


# ----------------------------------------------------------------------------
# every bad input: one line, exit status 2

BAD_TRAIN_VALUES = [
    ("--learning_rate=-1", "--learning_rate must be a positive number"),
    ("--learning_rate=nan", "--learning_rate must be a positive number"),
    ("--learning_rate=inf", "--learning_rate must be a positive number"),
    ("--seed=-1", "--seed must be 0 up to 2**64 - 1"),
    (f"--seed={2**64}", "--seed must be 0 up to 2**64 - 1"),
    ("--threads=-1", "--threads must be 0 (the idle cores) up to the"),
    ("--threads=1000000", "--threads must be 0 (the idle cores) up to the"),
    ("--muon_lr=0", "--muon_lr must be a positive number"),
    ("--max_seconds=-1", "--max_seconds must be a number >= 0"),
    ("--out_dir=", "--out_dir is empty"),
    ("--eval_tokens=-1", "--eval_tokens must be 0 or more"),
    ("--weight_decay=-5", "--weight_decay must be a number >= 0"),
    ("--min_lr=nan", "--min_lr must be a number >= 0"),
    ("--warmup_iters=-3", "--warmup_iters must be 0 or more"),
    ("--vocab_size=10", "--vocab_size is set by the data"),
    ("--byte_window=0", "--byte_window must be at least 1"),
    ("--budget_clock=gpu", "--budget_clock=gpu is not one of wall, cpu"),
    ("--device=tpu", "--device=tpu is not one of auto, cpu, cuda, cuda:N"),
    ("--block_size=100000", "fewer than the context needs"),
]


@pytest.mark.parametrize("arg, message", BAD_TRAIN_VALUES)
def test_train_refuses_bad_values(dataset, tmp_path, capsys, arg, message):
    line = one_line_error(capsys, train.main, train_args(dataset, tmp_path / "out", arg))
    assert message in line
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_train_refuses_a_cuda_device_it_does_not_have(dataset, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "torch sees no CUDA GPU" in one_line_error(capsys, train.main, train_args(dataset, tmp_path, "--device=cuda"))


def test_train_refuses_a_shape_beyond_memory(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "available_memory_bytes", lambda device: 2**20)
    line = one_line_error(capsys, train.main, train_args(dataset, tmp_path, "--batch_size=64"))
    assert "needs about" in line and "GiB to train" in line
    assert "the activations (--block_size=16 x --batch_size=64)" in line and "--n_embd" not in line
    # the estimate is an upper bound, not a guess: the real quick-start shape fits in a fraction of a GiB
    assert sum(train.training_memory_bytes(model_module.preset_config("cpu-tiny"), 12).values()) < 2**28


def test_resume_refuses_a_max_iters_below_the_saved_step(trained, capsys):
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={trained}", "--max_iters=5", "--threads=1"])
    assert "--max_iters=5 is below the checkpoint's step 10" in line


def test_a_fresh_run_refuses_a_used_folder(dataset, trained, capsys):
    before = (trained / "ckpt.pt").read_bytes()
    line = one_line_error(capsys, train.main, train_args(dataset, trained, "--max_iters=5"))
    assert "already holds a run" in line and "--overwrite" in line and "--resume" in line
    assert (trained / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("change", [{"corpus": "another"}, {"tokenization": "bpe", "vocab_size": 50257},
                                    {"train_tokens": -1}])
def test_resume_refuses_other_data(dataset, trained, tmp_path, capsys, change):
    """The whole data identity counts (corpus, tokenization, vocabulary, corpus size ...), not only the vocabulary."""
    other = tmp_path / "other"
    other.mkdir()
    for f in Path(dataset).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    meta = json.loads((other / "meta.json").read_text())
    # the files agree with the changed meta.json: only the data's identity differs from the checkpoint's
    if "vocab_size" in change:
        np.save(other / tokenizer.TOKEN_BYTES_NAME, np.ones(change["vocab_size"], dtype=np.int32))
    if "train_tokens" in change:
        change = {"train_tokens": meta["train_tokens"] - 1}
        (other / "train.bin").write_bytes((other / "train.bin").read_bytes()[:-1])
        meta["shards"]["train"][0]["tokens"] -= 1  # one shard, train.bin, as prepare writes a small corpus
    (other / "meta.json").write_text(json.dumps({**meta, **change}))
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={trained}", f"--dataset={other}", "--max_iters=20", "--threads=1"])
    assert "is not the data the checkpoint was trained on" in line and next(iter(change)) in line


def test_resume_accepts_the_same_data_copied_elsewhere(dataset, trained, tmp_path):
    copy_dir, run_dir = tmp_path / "data_copy", tmp_path / "run"
    copy_dir.mkdir()
    run_dir.mkdir()
    for f in Path(dataset).iterdir():
        (copy_dir / f.name).write_bytes(f.read_bytes())
    meta = json.loads((copy_dir / "meta.json").read_text())
    (copy_dir / "meta.json").write_text(json.dumps({**meta, "sources": ["/elsewhere/tiny.txt"]}))
    (run_dir / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    train.main(["--resume", f"--out_dir={run_dir}", f"--dataset={copy_dir}", "--max_iters=12", "--threads=1"])
    assert model_module.load_checkpoint(run_dir / "ckpt.pt")["step"] == 12


@pytest.fixture
def bad_files(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))

    class Payload:  # what a malicious checkpoint carries: unpickling it calls os.system
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    pickled = tmp_path / "pickled.pt"
    torch.save({"format": model_module.CHECKPOINT_FORMAT, "version": model_module.CHECKPOINT_VERSION,
                "model": Payload()}, pickled)
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {"LATIN1": str(latin1), "PICKLED": str(pickled), "RANDOM": str(random_bytes)}


BAD_SAMPLE_INPUTS = [
    (["--temperature=nan"], "--temperature must be a finite number >= 0"),
    (["--temperature=-1"], "--temperature must be a finite number >= 0"),
    (["--top_p=nan"], "--top_p must be in [0, 1]"),
    (["--top_p=1.5"], "--top_p must be in [0, 1], got 1.5"),
    (["--top_k=-1"], "--top_k must be 0 (every token) or more"),
    (["--num_samples=0"], "--num_samples must be at least 1, got 0"),
    (["--num_samples=-2"], "--num_samples must be at least 1, got -2"),
    (["--max_new_tokens=-1"], "--max_new_tokens must be 0 (the prompt alone) or more"),
    (["--seed=-1"], "--seed must be in [0, 2**63)"),
    (["--seed=" + str(2**64)], "--seed must be in [0, 2**63)"),
    (["--threads=-1"], "--threads must be 0 (the idle cores) up to the"),
    (["--ckpt=RANDOM"], "is not a torch checkpoint file (truncated, or another kind of file)"),
    (["--prompt=abc\udcff"], "--prompt is not valid UTF-8"),  # how Python hands over a non-UTF-8 argument
    (["--prompt=FILE:LATIN1"], "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (["--ckpt=PICKLED"], "refused: it holds pickled Python objects"),
    (["--ckpt=NOWHERE"], "no checkpoint at"),
]


@pytest.mark.parametrize("args, message", BAD_SAMPLE_INPUTS)
def test_sample_refuses_bad_input(trained, bad_files, capsys, args, message):
    files = {**bad_files, "NOWHERE": str(trained / "nothing.pt")}
    for name, path in files.items():
        args = [a.replace(name, path) for a in args]
    line = one_line_error(capsys, sample.main, [f"--ckpt={trained / 'ckpt.pt'}", "--threads=1", *args])
    assert message in line


def test_sample_blames_the_device_not_the_checkpoint(trained, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_error(capsys, sample.main, [f"--ckpt={trained / 'ckpt.pt'}", "--device=cuda"])
    assert "torch sees no CUDA GPU" in line and "checkpoint" not in line


def test_a_bpe_prompt_without_tiktoken_files_says_how_to_get_them(trained, tmp_path, capsys, monkeypatch):
    checkpoint = model_module.load_checkpoint(trained / "ckpt.pt")
    checkpoint["data_meta"] = {**checkpoint["data_meta"], "tokenization": "bpe"}
    model_module.save_checkpoint(checkpoint, tmp_path / "bpe.pt")
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tokenizer.gpt2_encoding.cache_clear()
    try:
        line = one_line_error(capsys, sample.main, [f"--ckpt={tmp_path / 'bpe.pt'}", "--threads=1"])
    finally:
        tokenizer.gpt2_encoding.cache_clear()
    assert "TIKTOKEN_CACHE_DIR" in line


def test_distill_refuses_a_pooled_teacher(dataset, pooled_checkpoint, tmp_path, capsys):
    line = one_line_error(capsys, distill.main, train_args(dataset, tmp_path, f"--teacher={pooled_checkpoint}"))
    assert "is a pooled byte model" in line


def test_model_script_refuses_unknown_arguments(capsys):
    assert "unknown option --bogus" in one_line_error(capsys, model_module.main, ["--bogus=1"])


# ----------------------------------------------------------------------------
# divergence, a full disk, and where files go

def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    train.main(train_args(dataset, out, "--max_iters=10"))
    good = (out / "ckpt.pt").read_bytes()
    # decoupled weight decay at this rate multiplies every weight by -99,999 per step: infinity within a few
    monkeypatch.setattr(train, "learning_rate", lambda *args: 1e6)
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={out}", "--max_iters=40", "--threads=1"])
    assert "training diverged at step" in line and "last good checkpoint" in line and "step 10" in line
    step = int(line.split("diverged at step ")[1].split(":")[0])
    assert 10 < step <= 40
    assert (out / "ckpt.pt").read_bytes() == good  # never overwritten by the diverged model
    assert not (out / "ckpt.pt.tmp").exists()


def test_the_first_non_finite_loss_is_named_exactly(dataset, tmp_path):
    calls = []

    def loss_turning_nan(model, x, y):
        calls.append(1)
        loss, extra = train.language_model_loss(model, x, y)
        return (loss * float("nan") if len(calls) == 13 else loss), extra

    config, model_config, _ = train.configure(train_args(dataset, tmp_path, "--max_iters=20"))
    _, device, data, model, optimizer, state = train.setup(config, model_config)
    with pytest.raises(UserError, match=r"diverged at step 13: the training loss is nan; the last good checkpoint "
                                        r"\(.*step 10\) is kept"):
        train.train_loop(model, optimizer, data, config, state, device, loss_fn=loss_turning_nan)
    assert model_module.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 10


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")])
def test_a_full_disk_keeps_the_previous_checkpoint(trained, tmp_path, capsys, monkeypatch, failure):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    before = (run_dir / "ckpt.pt").read_bytes()

    def full_disk(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 half a zip")  # torch had written part of the file
        raise failure

    monkeypatch.setattr(model_module.torch, "save", full_disk)
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={run_dir}", "--max_iters=20", "--threads=1"])
    assert "disk full" in line and "previous checkpoint kept" in line
    assert (run_dir / "ckpt.pt").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl", train.LOCK_NAME]  # no .tmp


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_logging_is_one_line_and_keeps_the_checkpoint(trained, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    before = (run_dir / "ckpt.pt").read_bytes()
    real_open = open
    # the metrics log is the one file opened for appending: that open fails as on a full disk
    monkeypatch.setattr(train, "open", lambda file, mode="r", *args, **kwargs: no_space() if "a" in mode
                        else real_open(file, mode, *args, **kwargs), raising=False)
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={run_dir}", "--max_iters=20", "--threads=1"])
    assert "No space left" in line and "checkpoint" in line and "--resume" in line
    assert (run_dir / "ckpt.pt").read_bytes() == before


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("some text\n" * 50)
    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(UserError, match="No space left on device.*--data_dir"):
        prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "t.txt"), data_dir=str(tmp_path / "data")))
    assert not list((tmp_path / "data").rglob("*.tmp"))


def snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


def test_resume_writes_only_where_the_command_line_says(trained, tmp_path, monkeypatch):
    """A checkpoint's stored out_dir (a copied run's, or a crafted one) never decides where files are written."""
    checkpoint = model_module.load_checkpoint(trained / "ckpt.pt")
    victim = tmp_path / "victim"
    checkpoint["train_config"]["out_dir"] = str(victim)
    for run_dir in (tmp_path / "copy", tmp_path / "cwd" / "out"):
        model_module.save_checkpoint(checkpoint, run_dir / "ckpt.pt")
    before = snapshot(tmp_path)
    train.main(["--resume", f"--out_dir={tmp_path / 'copy'}", "--max_iters=12", "--threads=1"])
    monkeypatch.chdir(tmp_path / "cwd")
    train.main(["--resume", "--max_iters=12", "--threads=1"])  # no --out_dir: the default, ./out
    after = snapshot(tmp_path)
    written = {p for p in after if before.get(p) != after[p]}
    assert written and all(p.parent in (tmp_path / "copy", tmp_path / "cwd" / "out") for p in written), written
    assert not victim.exists()


def test_each_step_is_logged_once_and_a_resume_keeps_the_schedule(dataset, tmp_path):
    out = tmp_path / "out"
    train.main(train_args(dataset, out, "--max_iters=20"))
    # as if killed after logging step 25 but before its checkpoint, mid-way through a line
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "loss": 9.0}\n{"step": 3')
    train.main(["--resume", f"--out_dir={out}", "--max_iters=30", "--threads=1"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in records if "val_bpb" in r] == [10, 20, 30]
    assert all(r.get("loss") != 9.0 for r in records)
    # the cosine was fixed by the first run (decay over its 20 steps): past it the floor, not a stretched cosine
    checkpoint = model_module.load_checkpoint(out / "ckpt.pt")
    config = train.TrainConfig(**checkpoint["train_config"])
    assert checkpoint["decay_iters"] == 20 and config.max_iters == 30
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[15] > config.min_lr and lrs[25] == pytest.approx(config.min_lr) == lrs[30]


def test_overwrite_starts_the_log_afresh(dataset, tmp_path):
    out = tmp_path / "out"
    train.main(train_args(dataset, out, "--max_iters=10"))
    train.main(train_args(dataset, out, "--max_iters=10", "--overwrite"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 10]  # two loss records and one evaluation, once


# ----------------------------------------------------------------------------
# kills at random moments resume bit for bit

KILL_RUN = ["--max_iters=60", "--eval_interval=4", "--log_interval=4", "--dropout=0.1"]


def launch_and_kill(args, signum, delay):
    """Start train.py, send signum `delay` seconds after its setup line, and wait; returns (exit status, stdout)."""
    proc = subprocess.Popen([sys.executable, "-u", "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stdout:  # wait for setup: a kill before then is a kill before any checkpoint can exist
        lines.append(line)
        if line.startswith("model:"):
            break
    time.sleep(delay)
    proc.send_signal(signum)
    lines += proc.stdout.readlines()
    return proc.wait(timeout=120), "".join(lines)


def test_kills_at_random_moments_resume_to_the_same_bits(dataset, tmp_path):
    straight = tmp_path / "straight"
    train.main(train_args(dataset, straight, *KILL_RUN))
    expected = model_module.load_checkpoint(straight / "ckpt.pt")

    out, rng = tmp_path / "killed", random.Random(11)
    args = train_args(dataset, out, *KILL_RUN)
    kills = [signal.SIGTERM, signal.SIGKILL, signal.SIGTERM]  # each launch costs a torch import: three
    for signum in kills:
        status, stdout = launch_and_kill(args, signum, delay=rng.uniform(0.0, 0.6))
        if status == 0:
            break  # finished before the signal came
        # SIGTERM saves at the next step boundary and exits 143 (or, in the instant before the loop installs
        # its handler, ends the process like SIGKILL would)
        assert status in (-signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGTERM), stdout
        if status == 128 + signal.SIGTERM:
            assert "stopped by SIGTERM" in stdout and "continue with --resume" in stdout
        if (out / "ckpt.pt").exists():
            # threads are the machine's, never the checkpoint's; another count sums floats in another order
            args = ["--resume", f"--out_dir={out}", "--threads=1"]
        else:  # killed before the first checkpoint: start again
            args = train_args(dataset, out, *KILL_RUN, "--overwrite")
    else:
        train.main(args)
    resumed = model_module.load_checkpoint(out / "ckpt.pt")
    assert resumed["step"] == 60
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    # every optimizer tensor too (Adam's moments, Muon's momentum), however the state dict nests them
    assert tensors_of(expected["optimizer"]) and tensors_of(expected["optimizer"]).keys() == tensors_of(
        resumed["optimizer"]).keys()
    for path, tensor in tensors_of(expected["optimizer"]).items():
        assert torch.equal(tensor, tensors_of(resumed["optimizer"])[path]), path


def tensors_of(tree, path=()):
    """{path: tensor} for every tensor in nested dicts and lists."""
    if torch.is_tensor(tree):
        return {path: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {p: t for key, value in items for p, t in tensors_of(value, (*path, key)).items()}


# ----------------------------------------------------------------------------
# every tokenization round-trips any bytes exactly

def random_byte_strings(count, seed=0):
    """Random bytes, random Unicode as UTF-8, and the two mixed: what users and attackers feed in."""
    rng = np.random.default_rng(seed)
    strings = []
    for i in range(count):
        n = int(rng.integers(0, 64))
        if i % 3 == 0:
            strings.append(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        else:
            points = rng.choice([rng.integers(32, 127), rng.integers(0x80, 0x800), rng.integers(0x800, 0xD800),
                                 rng.integers(0x10000, 0x110000), 10, 32], size=n)
            text = "".join(map(chr, points)).encode("utf-8")
            if i % 3 == 2:
                text += rng.integers(0x80, 0x100, 3, dtype=np.uint8).tobytes() + text[: n // 2]
            strings.append(text)
    return strings


FUZZ_STRINGS = 3000


def test_fuzz_bpe_and_bytes_gpt2_round_trip(gpt2):
    """GPT-2's tokens rebuild any text, and bytes_gpt2's markers, dropped, give back any bytes (UTF-8 or not)."""
    bpe_table, marked_table = tokenizer.token_byte_table("bpe"), tokenizer.token_byte_table("bytes_gpt2")
    for data in random_byte_strings(FUZZ_STRINGS, seed=1):
        text = data.decode("utf-8", errors="replace")  # what data/prepare.py tokenizes for bpe
        assert b"".join(bpe_table[i] for i in tokenizer.encode("bpe", text)) == text.encode("utf-8")
        marked = tokenizer.mark_gpt2_token_ends(data)
        assert b"".join(marked_table[i] for i in marked) == data
        assert (marked == tokenizer.GPT2_TOKEN_END).sum() >= (len(data) > 0)  # at least one token, when any byte


def test_fuzz_prepare_keeps_every_byte(tmp_path, capsys):
    """data/prepare.py on random files: train + val rebuild the input exactly, whatever the bytes."""
    strings = random_byte_strings(600, seed=2)
    for i in range(0, len(strings), 60):
        data = b"".join(strings[i:i + 60]) + b"tail bytes to split"
        source = tmp_path / f"in{i}.bin"
        source.write_bytes(data)
        folder = prepare.prepare(prepare.PrepareConfig(input=str(source), data_dir=str(tmp_path), name=f"d{i}"))
        rebuilt = (folder / "train.bin").read_bytes() + (folder / "val.bin").read_bytes()
        assert rebuilt == data


def test_prepare_warns_about_bytes_that_are_not_utf8(tmp_path, capsys):
    source = tmp_path / "program.bin"
    source.write_bytes(b"\x7fELF\x02\x01\x01\x00" + b"\xff\xfe" * 50 + b"readable text " * 20)
    prepare.prepare(prepare.PrepareConfig(input=str(source), data_dir=str(tmp_path)))
    err = capsys.readouterr().err
    assert "100 of 388 bytes of program.bin are not UTF-8" in err
    assert "bytes and bytes_gpt2 keep every byte" in err and "bpe and hf replace" in err
    source.write_bytes(b"clean text\n" * 40)
    prepare.prepare(prepare.PrepareConfig(input=str(source), data_dir=str(tmp_path)))
    assert "not UTF-8" not in capsys.readouterr().err


# ----------------------------------------------------------------------------
# fresh machines: offline, nothing outside the checkout

def test_offline_without_tiktoken_files_is_one_line(tmp_path):
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(empty_cache), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    (tmp_path / "t.txt").write_text("some text to tokenize\n" * 20)
    result = subprocess.run([sys.executable, "data/prepare.py", f"--input={tmp_path / 't.txt'}", "--tokenization=bpe",
                             f"--data_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.count("\n") == 1 and "TIKTOKEN_CACHE_DIR" in result.stderr


def test_nothing_refers_to_a_folder_outside_the_checkout():
    """
    Users have only the checkout: no code, test or document may point at a folder beside it. (.ci/run,
    which only CI runs, may use the copy of tiktoken's files that CI's offline machines keep there.)
    """
    outside = ["../" + "shared", "/work" + "/"]  # spelled in pieces, so this file does not match itself
    files = [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("*.txt"), *ROOT.glob("*.ini"),
             *ROOT.glob("tests/*.py"), *ROOT.glob("data/*.py")]
    for path in files:
        text = path.read_text(errors="replace")
        for folder in outside:
            assert folder not in text, f"{path.relative_to(ROOT)} refers to {folder}"


# ----------------------------------------------------------------------------
# train.py's run folder: one run at a time, data checked, resumes that only continue, unwritable folders

def test_one_run_at_a_time_in_a_folder(dataset, tmp_path, capsys):
    """A training or distillation into a folder another run trains in is refused, naming that run's PID."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-u", "train.py", *train_args(dataset, out, "--max_iters=100000")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in holder.stdout:  # its first evaluation, then its checkpoint: a run to resume
            if line.startswith("step 10:"):
                break
        deadline = time.monotonic() + 60
        while not (out / "ckpt.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for main, args in [(train.main, train_args(dataset, out, "--max_iters=5", "--overwrite")),
                           (distill.main, train_args(dataset, out, "--max_iters=5", "--overwrite")),
                           (train.main, ["--resume", f"--out_dir={out}", "--threads=1"])]:
            line = one_line_error(capsys, main, args)
            assert f"another run (PID {holder.pid}) is training in {out}" in line
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process, however it ends: the file left behind blocks nothing
    assert (out / train.LOCK_NAME).exists()
    train.main(train_args(dataset, out, "--max_iters=2", "--eval_interval=2", "--overwrite"))
    assert model_module.load_checkpoint(out / "ckpt.pt")["step"] == 2


def test_without_fcntl_a_run_goes_on_unlocked(dataset, tmp_path, monkeypatch):
    """Windows has no fcntl: the run trains as before, without a lock."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    assert train.lock_run_folder(tmp_path / "run") is None
    train.main(train_args(dataset, tmp_path / "out", "--max_iters=2", "--eval_interval=2"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ckpt.pt", "metrics.jsonl"]


def damage(folder, name):
    """Break one thing about a prepared dataset, as a crash, a disk or a hand edit would."""
    meta = json.loads((folder / "meta.json").read_text())
    if name == "truncated train.bin":  # the case: 1,001 bytes of many more
        (folder / "train.bin").write_bytes((folder / "train.bin").read_bytes()[:1001])
    elif name == "missing val.bin":
        (folder / "val.bin").unlink()
    elif name == "another dtype":
        (folder / "meta.json").write_text(json.dumps({**meta, "dtype": "uint16"}))
    elif name == "meta.json not JSON":
        (folder / "meta.json").write_text('{"tokenization": "bytes", "vocab')
    elif name == "meta.json without a count":
        (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "train_tokens"}))
    elif name == "meta.json with a bad dtype":
        (folder / "meta.json").write_text(json.dumps({**meta, "dtype": "float32"}))
    elif name == "missing token_bytes.npy":
        (folder / tokenizer.TOKEN_BYTES_NAME).unlink()
    elif name == "short token_bytes.npy":
        np.save(folder / tokenizer.TOKEN_BYTES_NAME, np.ones(100, dtype=np.int32))
    elif name == "token_bytes.npy not npy":
        (folder / tokenizer.TOKEN_BYTES_NAME).write_bytes(b"not an array")


DAMAGED_DATA = [
    ("truncated train.bin", "train.bin holds 1,001 bytes, but meta.json says"),
    ("missing val.bin", "val.bin is missing, but meta.json says"),
    ("another dtype", "train.bin holds"),
    ("meta.json not JSON", "meta.json is not readable JSON"),
    ("meta.json without a count", "meta.json is incomplete (no 'train_tokens')"),
    ("meta.json with a bad dtype", "meta.json holds dtype 'float32'"),
    ("missing token_bytes.npy", "token_bytes.npy is missing"),
    ("short token_bytes.npy", "token_bytes.npy holds int32 of shape (100,), not one count per token id"),
    ("token_bytes.npy not npy", "token_bytes.npy is not readable"),
]


@pytest.mark.parametrize("name, message", DAMAGED_DATA)
def test_damaged_data_is_one_line_naming_the_file_and_the_fix(dataset, tmp_path, capsys, name, message):
    folder = tmp_path / "data"
    folder.mkdir()
    for f in Path(dataset).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    damage(folder, name)
    line = one_line_error(capsys, train.main, train_args(folder, tmp_path / "out", "--max_iters=2"))
    assert message in line and "run python data/prepare.py again for data" in line
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("args, message", [
    (["--batch_size=8"], "--batch_size=8 is not the resumed run's 4: a resume may change only --max_iters"),
    (["--n_layer=3"], "--n_layer=3 is not the resumed run's 2"),
    (["--learning_rate=0.1"], "--learning_rate=0.1 is not the resumed run's 0.003"),
    (["--seed=1"], "--seed=1 is not the resumed run's 1337"),
    (["--overwrite"], "--resume continues the run in --out_dir, --overwrite replaces it"),
    (["--vocab_size=256"], "--vocab_size is set by the data"),
])
def test_resume_refuses_what_would_make_another_run(trained, capsys, args, message):
    before = (trained / "ckpt.pt").read_bytes()
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={trained}", "--threads=1", *args])
    assert message in line
    assert (trained / "ckpt.pt").read_bytes() == before


def test_resume_accepts_the_runs_own_values_and_what_it_may_change(trained, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    # the model's shape and the optimisation as stored, given again; intervals, threads and length changed
    train.main(["--resume", f"--out_dir={run_dir}", *TINY, "--eval_interval=4", "--log_interval=2",
                "--max_iters=12", "--preset=cpu-tiny", "--optimizer=muon"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_bpb" in r] == [12]  # after the copied checkpoint's step 10
    assert [r["step"] for r in records if "loss" in r] == [12]
    assert model_module.load_checkpoint(run_dir / "ckpt.pt")["train_config"]["eval_interval"] == 4


def test_resume_without_a_run_says_so(tmp_path, capsys):
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={tmp_path / 'nothing'}", "--threads=1"])
    assert f"no run to resume in {tmp_path / 'nothing'}" in line and "--ckpt" not in line
    # a file holding only a model (as reparam.py writes) is no run to continue either
    checkpoint = {"model": {}, "model_config": {}, "data_meta": {}}
    model_module.save_checkpoint(checkpoint, tmp_path / "merged" / "ckpt.pt")
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={tmp_path / 'merged'}", "--threads=1"])
    assert "holds a model but no run to continue" in line


def unwritable_folder(tmp_path, monkeypatch, how):
    """A --out_dir this process cannot write in, made three ways: a file in the way, or read-only."""
    if how == "a file in the way":
        (tmp_path / "file").write_text("not a folder")
        return tmp_path / "file" / "out"
    if how == "an existing file":
        (tmp_path / "file").write_text("not a folder")
        return tmp_path / "file"
    folder = tmp_path / "read_only"
    folder.mkdir()
    real_open = os.open

    # a read-only file system refuses to create or write files; os.open is how the run's lock opens
    def read_only(path, flags, *args):
        if Path(path).parent == folder and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    return folder


@pytest.mark.parametrize("how", ["a file in the way", "an existing file", "read-only"])
def test_an_unwritable_out_dir_is_one_line(dataset, tmp_path, capsys, monkeypatch, how):
    out = unwritable_folder(tmp_path, monkeypatch, how)
    line = one_line_error(capsys, train.main, train_args(dataset, out, "--max_iters=2"))
    assert f"cannot write in --out_dir={out}" in line and "pick a folder you can write to" in line


def test_a_read_only_run_folder_loses_nothing(trained, tmp_path, capsys, monkeypatch):
    """Resumed in a folder it cannot write, the run refuses before touching its checkpoint or its log."""
    folder = unwritable_folder(tmp_path, monkeypatch, "read-only")
    for name in ("ckpt.pt", "metrics.jsonl"):
        (folder / name).write_bytes((trained / name).read_bytes())
    before = snapshot(folder)
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={folder}", "--max_iters=20", "--threads=1"])
    assert "Read-only file system" in line
    assert snapshot(folder) == before


def test_an_unwritable_metrics_log_is_one_line(dataset, tmp_path, capsys, monkeypatch):
    """Without the lock (no fcntl), the metrics log is the first file written: refused in one line too."""
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setattr(Path, "write_text", no_space)
    line = one_line_error(capsys, train.main, train_args(dataset, tmp_path / "out", "--max_iters=2"))
    assert "cannot write in --out_dir" in line and "No space left on device" in line
    assert not (tmp_path / "out" / "metrics.jsonl.tmp").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: file permissions do not stop root's writes")
def test_a_folder_without_write_permission_is_one_line(dataset, tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        line = one_line_error(capsys, train.main, train_args(dataset, folder, "--max_iters=2"))
    finally:
        folder.chmod(0o755)
    assert f"cannot write in --out_dir={folder}" in line and "Permission denied" in line


def test_the_memory_refusal_names_the_parameters_when_they_dominate(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "available_memory_bytes", lambda device: 2**20)
    # 2 layers of width 2048: 100M parameters against a few thousand activations per token
    line = one_line_error(capsys, train.main, train_args(dataset, tmp_path, "--n_embd=2048"))
    assert "the parameters (--n_embd=2048, --n_layer=2) take" in line and "--block_size" not in line
