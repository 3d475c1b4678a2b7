"""Shared test setup: the project's modules on the path, one thread, and the tiny corpus and shapes most tests use."""

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


@pytest.fixture(params=tokenizer.SEGMENTERS)
def segmenter_name(request):
    """Each segmenter's name in turn; gpt2 is skipped when tiktoken's files cannot be had."""
    if request.param == "gpt2":
        request.getfixturevalue("gpt2")
    return request.param
