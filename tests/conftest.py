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


@pytest.fixture(params=tokenizer.SEGMENTERS)
def segmenter_name(request):
    """Each segmenter's name in turn; gpt2 is skipped when tiktoken's files cannot be had."""
    if request.param == "gpt2":
        request.getfixturevalue("gpt2")
    return request.param


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
    "speed-recipe": dict(ffn="relu2", qk_norm=True, logit_softcap=15.0),  # zero_init_proj: its own test
}
VARIANT_PARAMS = [pytest.param(v, id=k) for k, v in VARIANTS.items()]
CACHE_VARIANTS = [pytest.param(VARIANTS[k], id=k) for k in ("learned-gelu-layernorm", "rope", "gqa", "mqa-rope",
                                                            "block_repeat", "stlm-like", "speed-recipe")]
