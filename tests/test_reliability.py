"""
The promises of README's "Guarantees": no run is clobbered or silently wrong,
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

import checkpointing
import distill
import hardware
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
    ("--beta2=1.5", "--beta2 must be in [0, 1)"),
    ("--beta1=-0.1", "--beta1 must be in [0, 1)"),
    ("--seed=-1", "--seed must be 0 or more"),
    ("--threads=-1", "--threads must be 0 or more"),
    ("--eval_tokens=-1", "--eval_tokens must be 0 or more"),
    ("--grad_clip=-1", "--grad_clip must be a number >= 0"),
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
    monkeypatch.setattr(hardware, "available_memory_bytes", lambda device: 2**20)
    line = one_line_error(capsys, train.main, train_args(dataset, tmp_path, "--batch_size=64"))
    assert "needs about" in line and "GiB to train" in line
    # the estimate is an upper bound, not a guess: the real quick-start shape fits in a fraction of a GiB
    assert hardware.training_memory_bytes(model_module.preset_config("cpu-tiny"), 12) < 2**28


def test_resume_refuses_a_max_iters_below_the_saved_step(trained, capsys):
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={trained}", "--max_iters=5", "--threads=1"])
    assert "--max_iters=5 is below the checkpoint's step 10" in line


def test_a_fresh_run_refuses_a_used_folder(dataset, trained, capsys):
    before = (trained / "ckpt.pt").read_bytes()
    line = one_line_error(capsys, train.main, train_args(dataset, trained, "--max_iters=5"))
    assert "already holds a run" in line and "--overwrite" in line and "--resume" in line
    assert (trained / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("change", [{"corpus": "another"}, {"tokenization": "bpe", "vocab_size": 50257},
                                    {"train_tokens": 1}])
def test_resume_refuses_other_data(dataset, trained, tmp_path, capsys, change):
    """The whole data identity counts (corpus, tokenization, vocabulary, corpus size ...), not only the vocabulary."""
    other = tmp_path / "other"
    other.mkdir()
    for f in Path(dataset).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    meta = json.loads((other / "meta.json").read_text())
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
    return {"LATIN1": str(latin1), "PICKLED": str(pickled)}


BAD_SAMPLE_INPUTS = [
    (["--temperature=nan"], "finite --temperature"),
    (["--temperature=-1"], "finite --temperature"),
    (["--top_p=nan"], "0 <= --top_p <= 1"),
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

def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(train_args(dataset, out, "--max_iters=10", "--lr_decay_iters=100"))
    good = (out / "ckpt.pt").read_bytes()
    # decoupled weight decay at this rate multiplies every weight by -99,999 per step: infinity within a few
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={out}", "--max_iters=40", "--learning_rate=1e6", "--threads=1"])
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

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    line = one_line_error(capsys, train.main, ["--resume", f"--out_dir={run_dir}", "--max_iters=20", "--threads=1"])
    assert "disk full" in line and "previous checkpoint kept" in line
    assert (run_dir / "ckpt.pt").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]  # no ckpt.pt.tmp


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_logging_is_one_line_and_keeps_the_checkpoint(trained, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    before = (run_dir / "ckpt.pt").read_bytes()
    real_open = open
    # the metrics log is the one file opened for appending: that open fails as on a full disk
    monkeypatch.setattr(checkpointing, "open", lambda file, mode="r", *args, **kwargs: no_space() if "a" in mode
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
    config = train.TrainConfig(**model_module.load_checkpoint(out / "ckpt.pt")["train_config"])
    assert config.lr_decay_iters == 20
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


def test_fuzz_every_segmenter_round_trips(segmenter_name):
    segmenter = tokenizer.Segmenter(segmenter_name, max_chunk_bytes=7)
    for data in random_byte_strings(FUZZ_STRINGS):
        chunks = segmenter.split(data)
        assert tokenizer.join_chunks(chunks) == data


def test_fuzz_bytes_and_bpe_round_trip():
    byte_table = tokenizer.token_byte_table("bytes")
    tokenizations = ["bytes"]
    try:
        tokenizer.gpt2_encoding()
        tokenizations.append("bpe")
    except UserError:
        pass  # offline without the files: bpe is covered where they can be had
    tables = {t: tokenizer.token_byte_table(t) for t in tokenizations}
    for data in random_byte_strings(FUZZ_STRINGS, seed=1):
        text = data.decode("utf-8", errors="replace")  # what data/prepare.py tokenizes
        for tokenization in tokenizations:
            ids = tokenizer.encode(tokenization, text)
            assert b"".join(tables[tokenization][i] for i in ids) == text.encode("utf-8")
        assert b"".join(byte_table[b] for b in data) == data
    if "bpe" not in tokenizations:
        pytest.skip("bytes checked; bpe skipped: tiktoken's GPT-2 files are unavailable offline")


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
