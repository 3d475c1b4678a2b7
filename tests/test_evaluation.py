"""
evaluation.py: bits per byte through train.evaluate, and the lm-evaluation-harness model.

The adapter's log-likelihoods are compared with references written here from
the model's plain forward pass; accuracy is checked on small local tasks run
through lm-eval itself (a YAML with dataset_path: json, no network), built so
that the right answer is known: the choice the reference scores highest, so
a sign error (STLM's own wrapper picked the least likely answer) scores 0%.
"""

import json

import numpy as np
import pytest
import torch

import train
from cli import UserError
from data import prepare
from tools import evaluation
from model import GPT, GPTConfig, save_checkpoint

BYTES_META = {"tokenization": "bytes"}  # a pooled model reads bytes too
BLOCK = 24


def lively(config):
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def byte_model():
    torch.manual_seed(1)
    return lively(GPTConfig(block_size=BLOCK, vocab_size=256, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def pooled_model():
    torch.manual_seed(2)
    return lively(GPTConfig(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, embedder="pooled",
                            byte_width=16, byte_window=8))


def reference_byte_logp(model, context, continuation):
    """
    log p(continuation | context) for a byte model: log-softmax at each position, summed by hand. As lm-eval's
    Hugging Face model does, a context's trailing spaces are moved to the continuation.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ids = list((context or "\n").encode()) + list(continuation.encode())
    n_context = len((context or "\n").encode())
    ids = ids[-(model.config.block_size + 1):]  # what fits: the context is cut from the left
    n_context -= len(list((context or "\n").encode()) + list(continuation.encode())) - len(ids)
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(n_context, len(ids)))


# the last is longer than the context: cut from the left
CASES = [("To be, or not", " to be"), ("", "Hello"), ("  ", "Hi"), ("ab ", "cd"), ("naïve ", "café 🙂"),
         ("Whether 'tis nobler in the mind to suffer", " the slings")]


@pytest.mark.parametrize("which", ["bytes", "pooled"])
@pytest.mark.parametrize("context, continuation", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_byte_loglikelihood_equals_the_forward_pass(byte_model, pooled_model, which, context, continuation):
    model = byte_model if which == "bytes" else pooled_model
    lm = evaluation.StlmLM(model=model, meta=BYTES_META)
    logp, greedy = lm.loglikelihood_one(context, continuation)
    assert logp == pytest.approx(reference_byte_logp(model, context, continuation), abs=1e-4)
    assert logp < 0 and greedy in (True, False)


def test_long_continuations_are_scored_in_windows_like_train_evaluate(byte_model):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(3 * BLOCK + 5))
    lm = evaluation.StlmLM(model=byte_model, meta={"tokenization": "bytes"})
    # train.evaluate over the same units, laid out as consecutive windows, gives the same total nats
    ids = np.array(list(("\n" + text).encode()), dtype=np.int64)
    n = (len(ids) - 1) // BLOCK * BLOCK + 1
    one_byte_each = torch.ones(256, dtype=torch.long)
    expected = train.evaluate(byte_model, ids[:n], one_byte_each, BLOCK)["val_loss"] * (n - 1)
    units = torch.tensor(ids[:n])
    assert lm.score(units, 1)[0] == pytest.approx(-expected, rel=1e-5)


def test_generate_until_is_greedy_and_stops(byte_model):
    lm = evaluation.StlmLM(model=byte_model, meta={"tokenization": "bytes"})
    prompt = torch.tensor([list(b"To be")])
    greedy = bytes(byte_model.generate(prompt, 10, temperature=0)[0, 5:].tolist())
    greedy = greedy.decode("utf-8", errors="replace")
    assert lm.generate_one("To be", {"until": [], "max_gen_toks": 10}) == greedy
    stop = greedy[3:5]
    assert lm.generate_one("To be", {"until": [stop], "max_gen_toks": 10}) == greedy.split(stop)[0]


def test_lm_eval_hf_model_on_the_export_gives_the_same_numbers(tmp_path, byte_model):
    """`lm_eval --model hf --model_args pretrained=out/hf` on an exported model scores as this adapter."""
    pytest.importorskip("lm_eval.models.huggingface",
                        reason="lm-eval[hf] is not installed (requirements-extra.txt)")
    pytest.importorskip("transformers", reason="export needs transformers (requirements-extra.txt)")
    from tools import export
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    export.export(byte_model, "bytes", tmp_path / "hf")
    # a context of spaces only is left out: lm-eval's hf model then scores the continuation from
    # its second token
    cases = [(context, continuation) for context, continuation in CASES if context.strip() or not context]
    requests = [Instance("loglikelihood", {}, case, i) for i, case in enumerate(cases)]
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=1).loglikelihood(requests)
    ours = evaluation.StlmLM(model=byte_model, meta={"tokenization": "bytes"}).loglikelihood(requests)
    for (their_logp, their_greedy), (our_logp, our_greedy) in zip(theirs, ours):
        assert their_logp == pytest.approx(our_logp, abs=1e-4) and their_greedy == our_greedy


def write_task(folder, name, docs):
    """A local multiple-choice task: JSONL documents and a task YAML pointing at them."""
    with open(folder / f"{name}.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / name}.jsonl\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: '{{label}}'\ndoc_to_choice: '{{choices}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")


CONTEXTS = ["To be, or not to be", "Now is the winter of", "Friends, Romans, countrymen",
            "If music be the food", "All the world's a stage", "O Romeo, Romeo"]
CHOICES = [" that", " this", " the", " love"]


@pytest.mark.parametrize("which", ["bytes", "pooled"])
def test_lm_eval_picks_the_most_likely_choice(tmp_path, byte_model, pooled_model, which):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements-extra.txt)")
    model, meta, reference = byte_model if which == "bytes" else pooled_model, BYTES_META, reference_byte_logp
    best, worst = [], []
    for context in CONTEXTS:
        scores = [reference(model, context, choice) for choice in CHOICES]
        assert max(scores) - sorted(scores)[-2] > 1e-3  # a clear winner: ties would make the task ambiguous
        best.append({"context": context, "choices": CHOICES, "label": int(np.argmax(scores))})
        worst.append({"context": context, "choices": CHOICES, "label": int(np.argmin(scores))})
    write_task(tmp_path, "forced_best", best)
    write_task(tmp_path, "forced_worst", worst)
    lm = evaluation.StlmLM(model=model, meta=meta)
    results = evaluation.run_tasks(lm, ["forced_best", "forced_worst"], str(tmp_path))
    assert results["forced_best"]["acc,none"] == 1.0
    assert results["forced_worst"]["acc,none"] == 0.0  # the least likely answer is never picked


@pytest.fixture
def pooled_checkpoint(tmp_path, pooled_model):
    """A pooled checkpoint and the bytes data (data/prepare.py's) it names."""
    text = "Before we proceed any further, hear me speak. " * 300
    (tmp_path / "speech.txt").write_text(text)
    data = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "speech.txt"), data_dir=str(tmp_path)))
    save_checkpoint({"model": pooled_model.state_dict(), "model_config": pooled_model.config.__dict__,
                     "train_config": {"dataset": str(data)},
                     "data_meta": json.loads((data / "meta.json").read_text())},
                    tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt", data, text


def test_command_line_bits_per_byte_is_train_evaluate(pooled_checkpoint, pooled_model, capsys):
    ckpt, data, _ = pooled_checkpoint
    evaluation.main([f"--ckpt={ckpt}", "--threads=1"])
    dataset = train.load_dataset(str(data), BLOCK)
    expected = train.evaluate(pooled_model, dataset.val, dataset.token_bytes, BLOCK)["val_bpb"]
    assert f"{expected:.4f} bits per byte" in capsys.readouterr().out


def test_command_line_local_task(pooled_checkpoint, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements-extra.txt)")
    ckpt, _, text = pooled_checkpoint
    evaluation.main([f"--ckpt={ckpt}", f"--make_task={tmp_path / 'tasks'}", "--task_docs=5"])
    docs = [json.loads(line) for line in open(tmp_path / "tasks" / f"{evaluation.TASK_NAME}.jsonl")]
    assert len(docs) == 5
    for doc in docs:  # the labelled choice is what follows the context in the text; the others are not
        assert doc["context"] + doc["choices"][doc["label"]] in text
        assert len(doc["choices"]) == evaluation.DISTRACTORS + 1 == len(set(doc["choices"]))
    evaluation.main([f"--ckpt={ckpt}", f"--tasks={evaluation.TASK_NAME}",
                     f"--include_path={tmp_path / 'tasks'}", "--threads=1"])
    assert f"{evaluation.TASK_NAME}: acc " in capsys.readouterr().out


@pytest.mark.parametrize("option, message", [
    ("--eval_tokens=-1", "--eval_tokens must be 0"), ("--limit=-1", "--limit must be 0"),
    ("--threads=-1", "--threads must be 0"), ("--task_docs=0", "--task_docs must be at least 1"),
])
def test_bad_counts_are_refused_before_anything_loads(tmp_path, option, message):
    # the checkpoint does not exist: the count is refused first, before any loading
    with pytest.raises(UserError, match=message):
        evaluation.main([f"--ckpt={tmp_path / 'none.pt'}", option, f"--make_task={tmp_path / 'tasks'}"])
    assert not (tmp_path / "tasks").exists()


def test_another_dataset_is_scored_and_named(pooled_checkpoint, pooled_model, tmp_path, capsys):
    ckpt, data, _ = pooled_checkpoint
    (tmp_path / "other.txt").write_text("To be, or not to be, that is the question. " * 300)
    other = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "other.txt"), data_dir=str(tmp_path),
                                                  name="other_bytes"))
    evaluation.main([f"--ckpt={ckpt}", f"--dataset={other}", "--threads=1"])
    dataset = train.load_dataset(str(other), BLOCK)
    expected = train.evaluate(pooled_model, dataset.val, dataset.token_bytes, BLOCK)["val_bpb"]
    out = capsys.readouterr().out
    assert f"on {other} val" in out and f"{expected:.4f} bits per byte" in out
    assert str(data) not in out


def test_a_task_never_holds_more_documents_than_the_text_has_room_for(pooled_checkpoint, tmp_path):
    ckpt, _, text = pooled_checkpoint
    val_chars = len(evaluation.val_text(train.load_dataset(str(pooled_checkpoint[1]), BLOCK), len(text)))
    room = (val_chars - 1) // (evaluation.CONTEXT_CHARS + evaluation.CONTINUATION_CHARS)
    assert room >= 1
    with pytest.raises(UserError, match=f"room for {room} documents.*--task_docs={room} or fewer"):
        evaluation.main([f"--ckpt={ckpt}", f"--make_task={tmp_path / 'tasks'}", f"--task_docs={room + 1}"])
    assert not (tmp_path / "tasks").exists()
    evaluation.main([f"--ckpt={ckpt}", f"--make_task={tmp_path / 'tasks'}", f"--task_docs={room}"])
    assert len((tmp_path / "tasks" / f"{evaluation.TASK_NAME}.jsonl").read_text().splitlines()) == room


def test_an_unwritable_task_folder_is_one_line(pooled_checkpoint, tmp_path):
    ckpt, _, _ = pooled_checkpoint
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="could not write"):
        evaluation.main([f"--ckpt={ckpt}", f"--make_task={tmp_path / 'a_file' / 'tasks'}", "--task_docs=2"])
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_an_unknown_task_is_one_line_naming_the_closest(byte_model):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements-extra.txt)")
    lm = evaluation.StlmLM(model=byte_model, meta=BYTES_META)
    with pytest.raises(UserError, match="no lm-eval task 'hellaswagg': did you mean hellaswag"):
        evaluation.run_tasks(lm, ["hellaswagg"])
