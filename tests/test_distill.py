"""distill.py: the KD losses by hand, the teacher cache, alpha = 0 as train.py, a frozen teacher, a Hugging Face teacher."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distill
import optim
import train
from cli import EXIT_USAGE, UserError, run
from data import prepare
from conftest import TINY_TRAIN_ARGS as TINY
from model import GPT, load_checkpoint
from distill import fingerprint_module
from tokenizer import load_hf_tokenizer, token_byte_table

ROOT = Path(__file__).resolve().parent.parent

TEACHER_SHAPE = ["--n_layer=2", "--n_head=2", "--n_embd=48"]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("teacher")
    train.main(["--dataset=" + dataset, "--out_dir=" + str(out), *TINY, *TEACHER_SHAPE, "--max_iters=20"])
    return out / "ckpt.pt"


def run_distill(dataset, teacher, out_dir, *args):
    distill.main(["--dataset=" + dataset, "--teacher=" + str(teacher), "--out_dir=" + str(out_dir), *TINY, *args])
    return load_checkpoint(Path(out_dir) / "ckpt.pt")


# ----------------------------------------------------------------------------
# the losses against a hand computation

def softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def hand_buckets(probs, keep):
    """probabilities of the kept ids, then of everything else"""
    return [probs[i] for i in keep] + [1.0 - sum(probs[i] for i in keep)]


def hand_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


TEACHER_LOGITS = [2.0, 0.5, -1.0, 1.5, 0.0]
STUDENT_LOGITS = [0.3, 1.2, -0.4, 0.8, -2.0]


@pytest.mark.exercise(10)
@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [2, 5])
def test_kd_loss_matches_a_hand_computation(kind, temperature, k):
    teacher = softmax(TEACHER_LOGITS, temperature)
    keep = sorted(range(5), key=lambda i: -teacher[i])[:k]  # the teacher's top-k ids
    t, s = hand_buckets(teacher, keep), hand_buckets(softmax(STUDENT_LOGITS, temperature), keep)
    expected = temperature ** 2 * (hand_kl(t, s) if kind == "forward" else hand_kl(s, t))

    targets = distill.top_k_targets(torch.tensor([[TEACHER_LOGITS]]), k, temperature)
    assert targets.indices[0, 0].tolist() == keep
    dropped = 1.0 - sum(teacher[i] for i in keep)  # the cache records what the top-k drop
    assert math.exp(targets.tail.item()) == pytest.approx(dropped, abs=1e-7)
    loss = distill.distillation_loss(torch.tensor([[STUDENT_LOGITS]]), targets, temperature, kind)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.exercise(10)
@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_full_vocabulary_kd_equals_torch_kl_and_top_k_is_a_lower_bound(kind):
    teacher_logits, student_logits = torch.randn(3, 4, 11), torch.randn(3, 4, 11, requires_grad=True)
    log_t, log_s = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
    full = (torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="none") if kind == "forward"
            else torch.nn.functional.kl_div(log_t, log_s, log_target=True, reduction="none")).sum(-1).mean()
    every_token = distill.distillation_loss(student_logits, distill.top_k_targets(teacher_logits, 11, 1.0), 1.0, kind)
    assert every_token.item() == pytest.approx(full.item(), rel=1e-5)  # an empty tail bucket adds nothing
    every_token.backward()
    full_grad, = torch.autograd.grad(full, student_logits)
    assert torch.allclose(student_logits.grad, full_grad, atol=1e-6)  # and its gradient is no NaN
    # merging the dropped tokens into one bucket can only lose information: KL shrinks
    for k in (1, 3, 6):
        top_k = distill.distillation_loss(student_logits, distill.top_k_targets(teacher_logits, k, 1.0), 1.0, kind)
        assert -1e-6 <= top_k.item() <= full.item() + 1e-6


@pytest.mark.exercise(10)
def test_kd_gradient_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 3, 7)
    student = logits.clone().requires_grad_(True)
    loss = distill.distillation_loss(student, distill.top_k_targets(logits, 3, 2.0), 2.0, "reverse")
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad.abs().max().item() < 1e-6


# ----------------------------------------------------------------------------
# the cache

def test_teacher_windows_keep_every_target_once_with_half_a_window_of_context():
    for n_tokens, context, stride in [(100, 16, 0), (17, 16, 0), (64, 8, 0), (1001, 64, 0), (1001, 64, 64), (50, 8, 3)]:
        kept = []
        for start, first, last in distill.teacher_windows(n_tokens, context, stride):
            assert 0 <= start and start + context <= n_tokens - 1 and start < first <= last <= start + context
            # tokens of context before the first kept target
            assert start == 0 or first - 1 - start >= context - (stride or context // 2)
            kept.extend(range(first, last + 1))
        assert kept == list(range(1, n_tokens))


@pytest.mark.parametrize("n_tokens", [16, 10, 1])
def test_teacher_windows_longer_than_the_data_are_refused(n_tokens):
    # a window of 16 inputs needs 17 tokens: fewer would start it before the data (where numpy wraps around)
    with pytest.raises(UserError, match="windows of 16 tokens need at least 17 tokens"):
        distill.teacher_windows(n_tokens, 16)


def test_cached_batches_are_train_py_batches(dataset):
    data = train.load_dataset(dataset, 16).train
    fake_cache = {"indices": np.zeros((len(data), 2), np.uint16), "logprobs": np.zeros((len(data), 2), np.float16),
                  "tail": np.zeros(len(data), np.float32)}
    batch_fn = distill.cached_batch_fn(fake_cache, len(data))
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = batch_fn(data, 4, 16, ours, "cpu")
        x_ref, y_ref = train.get_batch(data, 4, 16, theirs, "cpu")
        assert torch.equal(x, x_ref) and torch.equal(y.tokens, y_ref)
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_cache_holds_the_teachers_predictions_and_refuses_a_mismatch(dataset, teacher_ckpt, tmp_path):
    data = train.load_dataset(dataset, 16)
    teacher = distill.load_teacher(teacher_ckpt, data, "cpu")
    config = distill.DistillConfig(top_k=4, temperature=2.0)
    cache_dir = tmp_path / "cache"
    meta = distill.build_cache(teacher, data.train, config, 16, cache_dir, "cpu")
    cache = distill.open_cache(cache_dir, distill.cache_description(teacher, data.train, config, 16))
    assert 0 < meta["mean_dropped_mass"] < 1
    # every kept row equals the teacher run on its own window
    for start, first, last in distill.teacher_windows(len(data.train), 16)[:3] + distill.teacher_windows(len(data.train), 16)[-2:]:
        x = torch.from_numpy(data.train[start:start + 16].astype(np.int64))[None]
        direct = distill.top_k_targets(teacher(x)[0], 4, 2.0)
        cols = slice(first - start - 1, last - start)
        assert np.array_equal(cache["indices"][first:last + 1], direct.indices[0, cols].numpy())
        assert np.allclose(cache["logprobs"][first:last + 1], direct.logprobs[0, cols].numpy(), atol=1e-2)
        assert np.allclose(cache["tail"][first:last + 1], direct.tail[0, cols].numpy())
    # any change of temperature, k, teacher or data is refused by name
    for changed, message in [(distill.DistillConfig(top_k=4, temperature=1.0), "temperature"),
                             (distill.DistillConfig(top_k=8, temperature=2.0), "top_k")]:
        with pytest.raises(UserError, match=message):
            distill.open_cache(cache_dir, distill.cache_description(teacher, data.train, changed, 16))
    with pytest.raises(UserError, match="different data"):  # as many tokens, other ones
        distill.open_cache(cache_dir, distill.cache_description(teacher, data.train[::-1].copy(), config, 16))
    with torch.no_grad():
        next(teacher.module.parameters()).add_(1.0)
    teacher.fingerprint = fingerprint_module(teacher.module)
    with pytest.raises(UserError, match="different teacher"):
        distill.open_cache(cache_dir, distill.cache_description(teacher, data.train, config, 16))


def test_a_student_refuses_a_cache_from_another_teacher_or_other_data(dataset, teacher_ckpt, tmp_path):
    cache = "--cache_dir=" + str(tmp_path / "cache")
    distill.main(["--dataset=" + dataset, "--teacher=" + str(teacher_ckpt), "--out_dir=" + str(tmp_path / "first"),
                  *TINY, cache, "--cache_tokens=600", "--cache_only"])
    # another teacher at the same shape and data: only its weights (another seed) tell it apart
    train.main(["--dataset=" + dataset, "--out_dir=" + str(tmp_path / "other"), *TINY, *TEACHER_SHAPE,
                "--max_iters=2", "--seed=7"])
    other = tmp_path / "other" / "ckpt.pt"
    for teacher, tokens, message in [(other, 600, re.escape(f"built from a different teacher ({teacher_ckpt}, weights ")),
                                     (teacher_ckpt, 500, "built over 600 training tokens, and this run's --cache_tokens "
                                                         "covers 500")]:
        with pytest.raises(UserError, match=message) as refused:
            distill.main(["--dataset=" + dataset, "--teacher=" + str(teacher), "--out_dir=" + str(tmp_path / "student"),
                          *TINY, "--max_iters=1", cache, f"--cache_tokens={tokens}"])
        assert "\n" not in str(refused.value) and str(refused.value).endswith("delete it or pass another --cache_dir")
    assert not (tmp_path / "student" / "ckpt.pt").exists()  # refused before training


# ----------------------------------------------------------------------------
# training

def test_alpha_zero_is_exactly_train_py(dataset, teacher_ckpt, tmp_path):
    train.main(["--dataset=" + dataset, "--out_dir=" + str(tmp_path / "plain"), *TINY, "--max_iters=12", "--dropout=0.1"])
    plain = load_checkpoint(tmp_path / "plain" / "ckpt.pt")
    distilled = run_distill(dataset, teacher_ckpt, tmp_path / "kd", "--alpha=0", "--max_iters=12", "--dropout=0.1")
    for name, tensor in plain["model"].items():
        assert torch.equal(tensor, distilled["model"][name]), name


def test_teacher_stays_frozen_through_a_step(dataset, teacher_ckpt):
    """The teacher's targets carry no gradient, and a student's step and an evaluation leave it as it was."""
    config, model_config, _ = train.configure(["--dataset=" + dataset, *TINY])
    data = train.load_dataset(dataset, 16)
    model_config.vocab_size = data.meta["vocab_size"]
    student = GPT(model_config)
    teacher = distill.load_teacher(teacher_ckpt, data, "cpu")
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    optimizer = optim.make_optimizer(student, config, "cpu")
    x, y = train.get_batch(data.train, 4, 16, torch.Generator().manual_seed(0), "cpu")
    logits, _ = teacher(x)
    assert not logits.requires_grad
    targets = distill.DistillTargets(y, distill.top_k_targets(logits, 8, 1.0))
    loss, parts = distill.make_loss_fn(distill.DistillConfig(alpha=0.7))(student, x, targets)
    loss.backward()
    optimizer.step()
    assert set(parts) == {"ce", "kd"}
    assert loss.item() == pytest.approx(0.3 * parts["ce"].item() + 0.7 * parts["kd"].item(), rel=1e-5)
    distill.report_teacher_bpb(teacher, data, 16, 64)
    assert not teacher.module.training
    for name, tensor in teacher.module.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())


@pytest.mark.parametrize("mode", [["--kd_loss=forward"], ["--kd_loss=reverse", "--temperature=2"], ["--embedder=pooled"]],
                         ids=["forward", "reverse", "pooled"])
def test_distillation_runs_and_logs_its_parts(dataset, teacher_ckpt, tmp_path, mode):
    checkpoint = run_distill(dataset, teacher_ckpt, tmp_path, "--max_iters=20", "--top_k=8", *mode)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["ce"] > 0 and r["kd"] >= 0 for r in steps)
    assert steps[-1]["kd"] < steps[0]["kd"]  # the student moves towards the teacher
    assert records[-1]["val_bpb"] < 8.0 and checkpoint["step"] == 20
    assert json.loads((tmp_path / "teacher_cache" / "meta.json").read_text())["top_k"] == 8


def one_line_error(capsys, argv):
    """distill.py's command line on argv: its one-line message, checking exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run(lambda: distill.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == EXIT_USAGE and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# the tiny teacher and student (TINY, TEACHER_SHAPE) read windows of 16 tokens
BAD_SETTINGS = [
    (["--kd_loss=sideways"], "--kd_loss=sideways is not one of forward, reverse"),
    (["--alpha=1.5"], "--alpha must be in [0, 1], got 1.5"),
    (["--alpha=nan"], "--alpha must be in [0, 1], got nan"),
    (["--temperature=0"], "--temperature must be a positive number, got 0.0"),
    (["--temperature=nan"], "--temperature must be a positive number, got nan"),
    (["--temperature=inf"], "--temperature must be a positive number, got inf"),
    (["--top_k=0"], "--top_k must be at least 1, got 0"),
    (["--teacher_context=-1"], "--teacher_context must be 0 or more, got -1"),
    (["--cache_stride=-1"], "--cache_stride must be 0 or more, got -1"),
    (["--cache_stride=17"], "--cache_stride=17 is longer than the teacher's windows (16 tokens)"),
    (["--cache_tokens=-5"], "--cache_tokens must be 0 or more, got -5"),
    (["--cache_tokens=100000000"], "--cache_tokens must be between 0 (all) and the"),
    (["--cache_tokens=10"], "--cache_tokens=10 covers less than one window of the student's 16 + 1 tokens"),
    (["--cache_tokens=10", "--alpha=0"], "--cache_tokens=10 covers less than one window"),
    (["--alpha=0", "--cache_only"], "--cache_only needs the teacher, and --alpha=0 trains without one"),
    (["--alpha=0", "--teacher_bpb"], "--teacher_bpb needs the teacher, and --alpha=0 trains without one"),
    (["--teacher_context=64"], "longer than it reads (16): pass --teacher_context=16 or less"),
    (["--teacher=none.pt"], "no teacher at none.pt: train one first"),
    (["--cache_dir=a_file/cache"], "cannot write the teacher cache to a_file/cache"),
]


@pytest.mark.parametrize("args, message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_settings_are_one_line_errors(dataset, teacher_ckpt, tmp_path, capsys, args, message):
    (tmp_path / "a_file").write_text("not a folder")
    line = one_line_error(capsys, ["--dataset=" + dataset, "--teacher=" + str(teacher_ckpt),
                                   "--out_dir=" + str(tmp_path / "student"), *TINY, "--max_iters=1", *args])
    assert message in line
    assert not (tmp_path / "student" / "ckpt.pt").exists()  # refused before training


def test_a_misspelt_key_is_named_with_its_closest_match():
    result = subprocess.run([sys.executable, "distill.py", "--temprature=2"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "error: unknown option --temprature: did you mean --temperature?"


# ----------------------------------------------------------------------------
# a Hugging Face teacher, built offline

@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory, corpus_text):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face teacher path needs transformers")
    tokenizers = pytest.importorskip("tokenizers", reason="building a tokenizer offline needs tokenizers")
    folder = tmp_path_factory.mktemp("hf_teacher")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([corpus_text.decode()], vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    data = prepare.prepare(prepare.PrepareConfig(input=str(folder / "tokenizer.json"), tokenization="hf",
                                                 tokenizer_dir=str(folder), data_dir=str(folder)))
    return folder, str(data)


def test_hf_tokenization_round_trips_bytes(hf_teacher, corpus_text):
    folder, data = hf_teacher
    meta = json.loads((Path(data) / "meta.json").read_text())
    assert meta["tokenization"] == "hf:" + str(folder.resolve())
    ids = np.fromfile(Path(data) / "train.bin", dtype=meta["dtype"])
    table = token_byte_table(meta["tokenization"])
    assert len(table) == meta["vocab_size"]
    assert sum(len(table[i]) for i in ids) == meta["train_bytes"]  # bits per byte divides by the true byte count


def test_hf_teacher_distills(hf_teacher, tmp_path):
    folder, data = hf_teacher
    checkpoint = run_distill(data, folder, tmp_path, "--max_iters=10", "--top_k=8")
    assert checkpoint["step"] == 10 and checkpoint["model_config"]["vocab_size"] == json.loads(
        (Path(data) / "meta.json").read_text())["vocab_size"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["kd"]) for r in records if "kd" in r)


def test_teacher_of_another_tokenization_is_refused(hf_teacher, teacher_ckpt, dataset, tmp_path):
    folder, hf_data = hf_teacher
    with pytest.raises(UserError, match="teacher's tokenization"):
        run_distill(hf_data, teacher_ckpt, tmp_path, "--max_iters=1")  # a bytes teacher on hf tokens
    with pytest.raises(UserError, match="tokenization=hf"):
        run_distill(dataset, folder, tmp_path, "--max_iters=1")  # a Hugging Face teacher on bytes


def test_data_of_another_hf_tokenizer_is_refused_and_a_copy_of_the_teachers_accepted(hf_teacher, corpus_text,
                                                                                       tmp_path):
    """Token ids the teacher reads as other bytes would train silently wrong: the byte tables must agree."""
    folder, _ = hf_teacher  # skipped, saying why, without transformers or tokenizers
    transformers, tokenizers = pytest.importorskip("transformers"), pytest.importorskip("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()  # other merges, and fewer tokens than the teacher's 300
    bpe.train_from_iterator([corpus_text.decode()[::-1]], vocab_size=280, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    other = tmp_path / "other"
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(other)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for tokenizer_dir in (other, copy):
        data = prepare.prepare(prepare.PrepareConfig(input=str(folder / "tokenizer.json"), tokenization="hf",
                                                     tokenizer_dir=str(tokenizer_dir), data_dir=str(tokenizer_dir)))
        tokenized = train.load_dataset(str(data), 16)
        if tokenizer_dir is other:
            with pytest.raises(UserError, match=f"tokenized by {re.escape(str(other.resolve()))}, whose token ids "
                                                "are not the teacher's: python data/prepare.py --tokenization=hf"):
                distill.load_teacher(folder, tokenized, "cpu")
        else:
            assert distill.load_teacher(folder, tokenized, "cpu").vocab_size == tokenized.meta["vocab_size"]


# ----------------------------------------------------------------------------
# a bytes student from the BPE teacher, and what is refused

@pytest.fixture(scope="module")
def hf_corpus_as_bytes(hf_teacher):
    """The Hugging Face teacher's corpus (its tokenizer.json) prepared as bytes: the byte student's data."""
    folder, _ = hf_teacher
    out = folder.parent / (folder.name + "_bytes")
    return str(prepare.prepare(prepare.PrepareConfig(input=str(folder / "tokenizer.json"), data_dir=str(out))))


@pytest.mark.exercise(10)
def test_empty_slots_count_as_no_outcome_on_both_sides():
    """Byte targets list fewer bytes than k: the loss is the KL over the listed bytes and the tail alone."""
    student_logits = torch.tensor([[[0.3, 1.2, -0.4, 0.8, -2.0]]])
    s = softmax(student_logits[0, 0].tolist(), 1.0)
    t = [0.5, 0.2, 0.3]  # bytes 1 and 3, then the tail; two empty slots repeating byte 1
    targets = distill.TeacherTargets(torch.tensor([[[1, 3, 1, 1]]]),
                                     torch.tensor([[[math.log(0.5), math.log(0.2), distill.NO_MASS, distill.NO_MASS]]]),
                                     torch.tensor([[math.log(0.3)]]))
    q = [s[1], s[3], 1.0 - s[1] - s[3]]
    for kind, expected in [("forward", hand_kl(t, q)), ("reverse", hand_kl(q, t))]:
        assert distill.distillation_loss(student_logits, targets, 1.0, kind).item() == pytest.approx(expected, rel=1e-5)


def test_an_interrupted_cache_build_continues_where_it_stopped(dataset, teacher_ckpt, tmp_path, monkeypatch, capsys):
    data = train.load_dataset(dataset, 16)
    teacher = distill.load_teacher(teacher_ckpt, data, "cpu")
    config = distill.DistillConfig(top_k=4)
    reference = distill.build_cache(teacher, data.train, config, 16, tmp_path / "whole", "cpu")
    undo = interrupt_the_third_batch(monkeypatch, type(teacher))
    with pytest.raises(KeyboardInterrupt):
        distill.build_cache(teacher, data.train, config, 16, tmp_path / "cut", "cpu")
    assert json.loads((tmp_path / "cut" / distill.CACHE_PROGRESS).read_text())["windows_done"] == 8
    undo()
    capsys.readouterr()
    resumed = distill.build_cache(teacher, data.train, config, 16, tmp_path / "cut", "cpu")
    assert "continuing an interrupted build at window 8" in capsys.readouterr().out
    assert resumed["data"] == reference["data"] and not (tmp_path / "cut" / distill.CACHE_PROGRESS).exists()
    for name in distill.CACHE_ARRAYS:
        assert np.array_equal(np.load(tmp_path / "cut" / f"{name}.npy"), np.load(tmp_path / "whole" / f"{name}.npy"))


def interrupt_the_third_batch(monkeypatch, teacher_class):
    """Cache builds in batches of 4 windows, the teacher raising Ctrl-C on its third batch; returns the undo."""
    monkeypatch.setattr(distill, "CACHE_BATCH", 4)
    calls, real_call = [], teacher_class.__call__

    def stop_on_third_batch(self, idx):
        calls.append(len(idx))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_call(self, idx)

    monkeypatch.setattr(teacher_class, "__call__", stop_on_third_batch)
    return lambda: monkeypatch.setattr(teacher_class, "__call__", real_call)


def test_an_interrupted_build_of_other_settings_is_refused_not_thrown_away(dataset, teacher_ckpt, tmp_path,
                                                                            monkeypatch, capsys):
    cache = tmp_path / "cache"
    argv = ["--dataset=" + dataset, "--teacher=" + str(teacher_ckpt), "--out_dir=" + str(tmp_path / "student"),
            *TINY, "--cache_dir=" + str(cache), "--cache_only", "--cache_tokens=600", "--top_k=4"]
    undo = interrupt_the_third_batch(monkeypatch, distill.Teacher)
    with pytest.raises(KeyboardInterrupt):
        distill.main(argv)
    undo()
    kept = {path.name: path.read_bytes() for path in cache.iterdir()}
    assert json.loads(kept[distill.CACHE_PROGRESS])["windows_done"] == 8
    for changed, named in [("--cache_tokens=500", "over 600 training tokens, and this run's --cache_tokens covers 500"),
                           ("--top_k=8", "with --top_k 4, and this run has 8"),
                           ("--temperature=2", "with --temperature 1.0, and this run has 2.0"),
                           ("--cache_stride=4", "with --cache_stride 8, and this run has 4")]:
        line = one_line_error(capsys, [*argv, changed])
        assert named in line, line
        assert line.endswith("run with its settings to continue it, or pass another --cache_dir "
                             "(or delete the folder) to start anew")
        assert {path.name: path.read_bytes() for path in cache.iterdir()} == kept  # nothing thrown away
    distill.main(argv)  # the same settings continue the build
    assert "continuing an interrupted build at window 8" in capsys.readouterr().out
    assert not (cache / distill.CACHE_PROGRESS).exists() and (cache / distill.CACHE_META).exists()


def test_a_build_says_what_it_covers_and_shows_its_rate_and_eta(dataset, teacher_ckpt, tmp_path, capsys):
    n_train = len(train.load_dataset(dataset, 16).train)
    distill.main(["--dataset=" + dataset, "--teacher=" + str(teacher_ckpt), "--out_dir=" + str(tmp_path), *TINY,
                  "--cache_only"])
    out, err = capsys.readouterr()
    windows = len(distill.teacher_windows(n_train, 16))
    assert (f"teacher cache: the teacher predicts {n_train - 1:,} positions, in {windows:,} windows of 16 tokens, "
            f"into {tmp_path / 'teacher_cache'} (--cache_tokens=N caches the first N training tokens only)") in out
    # tqdm's bar: elapsed<remaining, then positions per second
    assert re.search(r"teacher cache: 100%.*\[\d\d:\d\d<\d\d:\d\d, [\d.]+[kM]?pos/s\]", err), err


def test_a_damaged_cache_is_refused_in_one_line(dataset, teacher_ckpt, tmp_path, capsys):
    argv = ["--dataset=" + dataset, "--teacher=" + str(teacher_ckpt), "--out_dir=" + str(tmp_path / "student"),
            *TINY, "--cache_dir=" + str(tmp_path / "cache"), "--cache_only", "--cache_tokens=600"]
    distill.main(argv)
    meta, tail = tmp_path / "cache" / distill.CACHE_META, tmp_path / "cache" / "tail.npy"
    good_meta, good_tail = meta.read_bytes(), tail.read_bytes()
    meta.write_text("{")  # a torn or hand-edited meta.json
    assert "meta.json is not readable" in one_line_error(capsys, argv)
    meta.write_bytes(good_meta)
    tail.write_bytes(good_tail[:len(good_tail) // 2])  # a truncated array
    assert "is damaged" in one_line_error(capsys, argv)
    tail.write_bytes(good_tail)
    distill.main(argv)  # whole again: accepted


def test_bytes_student_distills_from_a_bpe_teacher(hf_teacher, hf_corpus_as_bytes, tmp_path):
    folder, hf_data = hf_teacher
    checkpoint = run_distill(hf_corpus_as_bytes, folder, tmp_path, "--teacher_dataset=" + hf_data, "--max_iters=10",
                             "--top_k=8", "--teacher_context=16", "--cache_tokens=300", "--teacher_bpb")
    assert checkpoint["step"] == 10 and checkpoint["model_config"]["vocab_size"] == 256
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["kd"]) and r["kd"] >= 0 for r in records if "kd" in r)
    steps = [r for r in records if "kd" in r]
    assert steps[-1]["kd"] < steps[0]["kd"]  # the student moves towards the byte targets
    covered = json.loads((tmp_path / "teacher_cache" / "meta.json").read_text())["tokens"]
    assert covered == 300


def test_the_twin_of_a_partly_cached_student_trains_on_the_same_part(hf_teacher, hf_corpus_as_bytes, tmp_path):
    """--alpha=0 --cache_tokens=N: train.py's batches, over the bytes those N teacher tokens cover only."""
    folder, hf_data = hf_teacher
    teacher_data, data = train.load_dataset(hf_data, 1), train.load_dataset(hf_corpus_as_bytes, 1)
    n_bytes = distill.student_positions(teacher_data.train[:300], teacher_data, data)
    assert n_bytes == sum(len(token_byte_table(teacher_data.meta["tokenization"])[i]) for i in teacher_data.train[:300])
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    twin = distill.no_teacher_batches(distill.DistillConfig(cache_tokens=300), teacher_data.train[:300],
                                      teacher_data, data)
    x, y = twin(data.train, 64, 16, ours, "cpu")
    x_ref, y_ref = train.get_batch(data.train[:n_bytes], 64, 16, theirs, "cpu")
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    run_distill(hf_corpus_as_bytes, folder, tmp_path, "--alpha=0", "--teacher_dataset=" + hf_data, "--cache_tokens=300",
                "--max_iters=2")


def test_teacher_bpb_is_train_evaluate_on_the_teacher(hf_teacher):
    folder, hf_data = hf_teacher
    data = train.load_dataset(hf_data, 16)
    teacher = distill.load_teacher(folder, data, "cpu")
    result = distill.report_teacher_bpb(teacher, data, 16, 0)
    assert not teacher.module.training  # still frozen: no dropout in what follows
    # by hand: the Hugging Face model's own loss over the same non-overlapping windows
    n = (len(data.val) - 1) // 16
    windows = torch.from_numpy(data.val[:n * 16 + 1].astype(np.int64))
    x, y = windows[:-1].view(n, 16), windows[1:].view(n, 16)
    logits = teacher.module(input_ids=x).logits[..., :data.meta["vocab_size"]]
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    assert result["val_bpb"] == pytest.approx(nats / math.log(2) / data.token_bytes[y].sum().item(), rel=1e-4)


def test_byte_mismatches_and_pooled_teachers_are_one_line_errors(hf_teacher, hf_corpus_as_bytes, dataset, teacher_ckpt, tmp_path):
    folder, hf_data = hf_teacher
    with pytest.raises(UserError, match="do not hold the same bytes"):  # the cat-sat corpus is not the teacher's
        run_distill(dataset, folder, tmp_path, "--teacher_dataset=" + hf_data, "--max_iters=1")
    with pytest.raises(UserError, match="distills a bytes student"):
        run_distill(hf_data, folder, tmp_path, "--teacher_dataset=" + hf_data, "--max_iters=1")
    with pytest.raises(UserError, match="teacher's own tokenization"):
        run_distill(hf_corpus_as_bytes, folder, tmp_path, "--teacher_dataset=" + hf_corpus_as_bytes, "--max_iters=1")
    train.main(["--dataset=" + dataset, "--out_dir=" + str(tmp_path / "pooled_teacher"), *TINY, "--max_iters=1",
                "--embedder=pooled"])
    with pytest.raises(UserError, match="is a pooled byte model"):
        run_distill(dataset, tmp_path / "pooled_teacher" / "ckpt.pt", tmp_path, "--max_iters=1")


# ----------------------------------------------------------------------------
# a .gguf teacher (how SmolLM2 ships), written by the gguf package from a tiny random model

GGUF_SHAPE = dict(hidden=32, layers=2, heads=2, ffn=64, context=64)


def write_tiny_gguf(path, bpe):
    """A random llama-architecture model with the byte-level BPE's vocabulary and merges, as a .gguf file."""
    gguf = pytest.importorskip("gguf", reason="a .gguf teacher needs the gguf package (requirements-extra.txt)")
    state = json.loads(bpe._tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(state["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    h, ffn = GGUF_SHAPE["hidden"], GGUF_SHAPE["ffn"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(GGUF_SHAPE["context"])
    writer.add_embedding_length(h)
    writer.add_block_count(GGUF_SHAPE["layers"])
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(GGUF_SHAPE["heads"])
    writer.add_head_count_kv(GGUF_SHAPE["heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(h // GGUF_SHAPE["heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")  # byte-level BPE, as SmolLM2's
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    rng = np.random.default_rng(0)
    weights = {"token_embd.weight": (len(tokens), h), "output.weight": (len(tokens), h), "output_norm.weight": None}
    for i in range(GGUF_SHAPE["layers"]):
        weights.update({f"blk.{i}.{name}.weight": (h, h) for name in ("attn_q", "attn_k", "attn_v", "attn_output")})
        weights.update({f"blk.{i}.attn_norm.weight": None, f"blk.{i}.ffn_norm.weight": None,
                        f"blk.{i}.ffn_gate.weight": (ffn, h), f"blk.{i}.ffn_up.weight": (ffn, h),
                        f"blk.{i}.ffn_down.weight": (h, ffn)})
    for name, shape in weights.items():  # None: a norm's gain, ones
        writer.add_tensor(name, np.ones(h, np.float32) if shape is None else
                          (0.1 * rng.standard_normal(shape)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_file_loads_as_a_teacher_and_distills_a_bytes_student(hf_teacher, hf_corpus_as_bytes, corpus_text, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="building a tokenizer offline needs tokenizers")
    folder, _ = hf_teacher
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([corpus_text.decode()], vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"])
    model_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(model_file, bpe)
    gguf_data = str(prepare.prepare(prepare.PrepareConfig(input=str(folder / "tokenizer.json"), tokenization="hf",
                                                          tokenizer_dir=str(model_file), data_dir=str(tmp_path / "data"))))
    sample = corpus_text[:200].decode()  # the .gguf's tokenizer is the BPE it was written from
    assert load_hf_tokenizer(model_file).encode(sample, add_special_tokens=False) == bpe.encode(sample).ids
    teacher = distill.load_teacher(model_file, train.load_dataset(gguf_data, 16), "cpu")
    assert teacher.is_hf and teacher.context == GGUF_SHAPE["context"] and teacher.vocab_size == len(bpe.get_vocab())
    checkpoint = run_distill(hf_corpus_as_bytes, model_file, tmp_path / "student", "--teacher_dataset=" + gguf_data,
                             "--max_iters=5", "--top_k=8", "--teacher_context=16", "--cache_tokens=200")
    assert checkpoint["step"] == 5 and checkpoint["model_config"]["vocab_size"] == 256
