"""
Shared test setup: the project's modules on the path, one thread, the tiny corpus and shapes most
tests use, and the exercise markers that tools/exercises.py grades by.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tokenizer  # noqa: E402
from cli import UserError  # noqa: E402
from data import prepare  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# one thread: results are deterministic and two test processes never fight over cores
torch.set_num_threads(1)

# a tiny model and a few steps: a training run of train.py takes about a second on one thread
TINY_TRAIN_ARGS = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
                   "--eval_interval=10", "--eval_tokens=512", "--log_interval=5", "--threads=1",
                   "--learning_rate=3e-3", "--warmup_iters=10"]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def in_a_temp_folder(tmp_path, monkeypatch):
    """
    Run each test from an empty folder: scripts called in-process with their
    default paths (out/, out-bench/) write there, never into the checkout, and
    a user's own out/ from the quick start cannot change a test's outcome.
    """
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def corpus_text():
    """Repetitive enough that a two-layer model learns it in a few dozen steps."""
    rng = np.random.default_rng(0)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat. ", "a ", "dog ", "ran\n"]
    return "".join(rng.choice(words, size=6000)).encode()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, corpus_text):
    """corpus_text prepared as bytes by data/prepare.py: the folder's path."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "tiny.txt").write_bytes(corpus_text)
    return str(prepare.prepare(prepare.PrepareConfig(input=str(folder / "tiny.txt"), data_dir=str(folder))))


@pytest.fixture
def gpt2():
    """tiktoken's GPT-2 encoding; the test is skipped when its files cannot be had (offline, no cache)."""
    try:
        return tokenizer.gpt2_encoding()
    except UserError as e:
        pytest.skip(f"GPT-2 BPE files unavailable: {e}")


# ----------------------------------------------------------------------------
# tiny models for the model and generation tests

VOCAB = 101  # not a power of two, not 256: catches a vocabulary size hard-coded anywhere


def tiny_config(**overrides):
    base = dict(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **overrides})


def tiny_model(**overrides):
    return GPT(tiny_config(**overrides)).eval()


def lively_model(**overrides):
    """
    A tiny model with large random weights. At GPT-2's small init, greedy decoding
    soon repeats one token forever, and a test of what the model conditions on
    then passes whatever the context is; large weights make the output depend on it.
    """
    model = tiny_model(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def random_ids(B, T, vocab=VOCAB):
    return torch.randint(0, vocab, (B, T))


# the architectural knobs, each on its own and all together
VARIANTS = {
    "learned-gelu-layernorm": {},
    "bias": dict(bias=True),
    "rope": dict(pos="rope"),
    "swiglu": dict(ffn="swiglu"),
    "rmsnorm": dict(norm="rmsnorm"),
    "gqa": dict(n_kv_head=2),
    "mqa-rope": dict(n_kv_head=1, pos="rope"),
    "block_repeat": dict(block_repeat=2),
    "share_ffn": dict(share_ffn=True),
    "stlm-like": dict(pos="rope", ffn="swiglu", norm="rmsnorm", n_kv_head=2, block_repeat=2, share_ffn=True),
    "speed-recipe": dict(ffn="relu2", qk_norm=True),
    "ngram": dict(ngram_buckets=31),
}
VARIANT_PARAMS = [pytest.param(v, id=k) for k, v in VARIANTS.items()]
CACHE_VARIANTS = [pytest.param(VARIANTS[k], id=k) for k in ("learned-gelu-layernorm", "rope", "gqa", "mqa-rope",
                                                            "block_repeat", "stlm-like", "speed-recipe", "ngram")]


# ----------------------------------------------------------------------------
# exercises: @pytest.mark.exercise(N) marks a quick test that grades exercise N (EXERCISES.md);
# `pytest --exercise=N` runs only those, and tools/exercises.py reads --exercise-report as tests end

def pytest_addoption(parser):
    parser.addoption("--exercise", default="", metavar="N[,M...]",
                     help="run only the tests marked @pytest.mark.exercise(N) for one of these exercises")
    parser.addoption("--exercise-report", default="", metavar="FILE",
                     help="append one JSON line per test as it ends (what tools/exercises.py shows)")


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(*numbers): a quick test that grades these exercises "
                                       "(python tools/exercises.py check N)")
    if config.getoption("--exercise-report"):
        config.pluginmanager.register(ExerciseReport(config.getoption("--exercise-report")))


def exercises_graded_by(item):
    return sorted({number for mark in item.iter_markers("exercise") for number in mark.args})


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--exercise")
    if not wanted:
        return
    if not all(part.strip().isdigit() for part in wanted.split(",")):
        raise pytest.UsageError(f"--exercise takes exercise numbers like 6 or 1,4, got {wanted!r}")
    numbers = {int(part) for part in wanted.split(",")}
    graded = [item for item in items if numbers & set(exercises_graded_by(item))]
    config.hook.pytest_deselected(items=[item for item in items if item not in graded])
    items[:] = graded


class ExerciseReport:
    """
    One JSON line per test when its teardown ends: its outcome, the exercises it grades, and for a
    failure the whole report (traceback, captured output: a stub's message can be anywhere in it).
    """

    def __init__(self, path):
        self.path, self.graded, self.tests = path, {}, {}

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def pytest_collection_finish(self, session):
        self.graded = {item.nodeid: exercises_graded_by(item) for item in session.items}
        self.write({"collected": len(session.items)})

    def pytest_runtest_logreport(self, report):
        test = self.tests.setdefault(report.nodeid, {"id": report.nodeid, "outcome": "passed", "message": "",
                                                     "text": ""})
        if report.failed or (report.skipped and test["outcome"] == "passed"):
            test["outcome"] = report.outcome
            crash = getattr(report.longrepr, "reprcrash", None)
            if report.skipped and isinstance(report.longrepr, tuple):
                test["message"] = report.longrepr[2]  # (file, line, reason)
            else:
                test["message"] = crash.message if crash else report.longreprtext.strip().split("\n")[-1]
            test["text"] = "\n".join([report.longreprtext, *(content for _, content in report.sections)])
        if report.when == "teardown":
            self.write({**self.tests.pop(report.nodeid), "exercises": self.graded.get(report.nodeid, [])})
