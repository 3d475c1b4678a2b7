"""
Evaluate a checkpoint: bits per byte on its own data, and lm-evaluation-harness tasks.

    python tools/evaluation.py --ckpt=out/ckpt.pt                          # val bits per byte
    python tools/evaluation.py --ckpt=out/ckpt.pt --tasks=hellaswag,arc_easy --limit=500
    python tools/evaluation.py --ckpt=out/ckpt.pt --make_task=out/tasks    # a task from val text
    python tools/evaluation.py --ckpt=out/ckpt.pt --tasks=stlm_continuation --include_path=out/tasks

lm-eval's own tasks (hellaswag, arc_easy, blimp, ...) need the network once, to download them.

Bits per byte is train.evaluate's, the project's one such function. Tasks are scored by an
lm-eval model, `stlm` (StlmLM below), with the model's own probabilities, so byte, BPE and
pooled models meet on the same tasks, and an exported model under `lm_eval --model hf` gives
the same numbers. lm-eval's own command line cannot see a model class from a project that is
not pip-installed, so this file is the command line; from Python, `import tools.evaluation`
then `lm_eval.simple_evaluate(model="stlm", model_args="ckpt=out/ckpt.pt", ...)`.
"""

import codecs
import difflib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# run from anywhere: the project's modules are one folder up
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train
from cli import UserError, parse_config, pick_device, require, run, set_threads, write_atomic
from model import load_checkpoint, model_from_checkpoint
from tokenizer import encode, token_byte_table, unit_to_bytes

try:  # lm-eval is an optional extra: the bits-per-byte half of this file works without it
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    LM, register_model = object, None

# what a text with no context is scored after: the models have no start-of-text symbol
EMPTY_CONTEXT = "\n"
# the local task written by --make_task: a val passage, then its true next characters among
# distractors; chance is 1 / (DISTRACTORS + 1) (hellaswag's 25%, arc_easy's about 25%, blimp's 50%)
TASK_NAME = "stlm_continuation"
CONTEXT_CHARS = 200
CONTINUATION_CHARS = 24
DISTRACTORS = 3
TASK_WRITE_FIX = "pick another --make_task folder"  # what a failed write tells the user


@dataclass
class EvaluateConfig:
    ckpt: str = "out/ckpt.pt"
    dataset: str = ""  # prepared data for bits per byte; empty = the checkpoint's own
    eval_tokens: int = 0  # validation tokens scored (from the start of val); 0 = all
    tasks: str = ""  # comma-separated lm-eval tasks; empty = bits per byte only
    include_path: str = ""  # a folder of extra task YAMLs (what --make_task writes)
    limit: int = 0  # documents per task; 0 = all
    make_task: str = ""  # write the local continuation task (YAML + JSONL) into this folder
    task_docs: int = 200  # documents in that task
    device: str = "cpu"
    threads: int = 0  # CPU threads for torch; 0 = the cores idle at the start


# ----------------------------------------------------------------------------
# bits per byte: train.evaluate on the checkpoint's own data

def dataset_for(checkpoint, name):
    """The prepared dataset called name, checked against the checkpoint's model."""
    config = checkpoint["model_config"]
    dataset = train.load_dataset(name, config["block_size"])
    for key, value in train.model_keys_from_data(dataset.meta).items():
        if config.get(key) != value:
            raise UserError(f"the checkpoint's {key} ({config.get(key)}) does not match {name}'s "
                            f"({value}): pass the --dataset it was trained on")
    return dataset


def val_text(dataset, n_bytes):
    """The first n_bytes of the validation text, as a string (a cut character is dropped)."""
    ids = torch.from_numpy(dataset.val[:2 * n_bytes].astype(np.int64))
    # bytes_gpt2's markers are tokens of no bytes: count bytes, not tokens
    covered = dataset.token_bytes[ids].cumsum(0)
    n_tokens = int(torch.searchsorted(covered, n_bytes)) + 1
    table = token_byte_table(dataset.meta["tokenization"])
    data = b"".join(table[token] for token in ids[:n_tokens].tolist())
    return data[:n_bytes].decode("utf-8", errors="ignore")


# ----------------------------------------------------------------------------
# the lm-evaluation-harness model

class StlmLM(LM):
    """An lm-eval model scoring with a checkpoint's own probabilities: model_args ckpt=PATH."""

    def __init__(self, ckpt="out/ckpt.pt", device="cpu", model=None, meta=None, **lm_eval_settings):
        # lm-eval also passes batch_size and max_batch_size: requests are scored one at a time.
        # Scoring needs only the model: lm-eval itself is needed to run its tasks (run_tasks)
        super().__init__()
        if model is None:  # tests pass a model and its data's meta directly
            checkpoint = load_checkpoint(ckpt, device)
            model, meta = model_from_checkpoint(checkpoint).to(device), checkpoint["data_meta"]
        self.model, self.meta = model.eval(), meta
        self.tokenization = meta["tokenization"]
        self.to_bytes = unit_to_bytes(self.tokenization)
        self.block_size = model.config.block_size

    def units(self, text):
        """Token ids (n,) of a text, as the model was trained on (a pooled model's are bytes)."""
        device = next(self.model.parameters()).device
        return torch.tensor(encode(self.tokenization, text), dtype=torch.long, device=device)

    @torch.no_grad()
    def score(self, units, first):
        """
        (log p of units[first:] given the units before them, whether each was the
        model's greedy choice). A context longer than block_size is cut from the
        left; a longer continuation is scored in consecutive windows, as
        train.evaluate scores its validation text.
        """
        logp, greedy, start = 0.0, True, first
        while start < len(units):
            # targets start..end-1; inputs low..end-2 predict low+1..end-1
            end = min(len(units), start + self.block_size)
            low = max(0, end - 1 - self.block_size)
            x, y = units[None, low:end - 1], units[None, low + 1:end]
            # the model's own head and loss, as GPT.forward applies them, on scored positions only
            h = self.model.hidden_states(x)[:, start - 1 - low:]
            y = y[:, start - 1 - low:]
            logits = self.model.head(h)
            logp -= F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            greedy = greedy and bool((logits.argmax(-1) == y).all())
            start = end
        return logp, greedy

    def text_logp(self, text):
        """log p(text) as a whole, after EMPTY_CONTEXT; 0 for the empty text."""
        prefix, units = self.units(EMPTY_CONTEXT), self.units(text)
        return self.score(torch.cat([prefix, units]), len(prefix))[0]

    def loglikelihood_one(self, context, continuation):
        # split as lm-eval's Hugging Face model splits it, so an exported model scores the same
        # there: trailing spaces of the context move to the continuation (" Paris" is one BPE
        # token), the whole text is tokenized, and the context's token count marks the cut
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            context_units, continuation_units = self.units(EMPTY_CONTEXT), self.units(continuation)
        else:
            whole = self.units(context + continuation)
            cut = len(self.units(context))
            context_units, continuation_units = whole[:cut], whole[cut:]
        return self.score(torch.cat([context_units, continuation_units]), len(context_units))

    def loglikelihood(self, requests, disable_tqdm=False):
        return [self.loglikelihood_one(*request.args)
                for request in tqdm(requests, desc="loglikelihood", disable=disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        return [self.text_logp(request.args[0])
                for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm)]

    @torch.no_grad()
    def generate_one(self, context, options):
        """Greedy (or at the task's temperature) to a stop string or max_gen_toks units (or 256)."""
        stops = options.get("until") or []
        stops = [stops] if isinstance(stops, str) else stops
        temperature = options.get("temperature", 0.0) if options.get("do_sample", False) else 0.0
        prompt = self.units(context or EMPTY_CONTEXT)[-self.block_size:]
        # units are decoded as they come: a character's bytes may arrive in several units
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        n_units = options.get("max_gen_toks", 256)
        for unit in self.model.generate_stream(prompt[None], n_units, temperature=temperature):
            text += decoder.decode(self.to_bytes(unit))
            if any(stop in text for stop in stops):
                break
        text += decoder.decode(b"", final=True)
        for stop in stops:
            text = text.split(stop)[0]
        return text

    def generate_until(self, requests, disable_tqdm=False):
        return [self.generate_one(*request.args)
                for request in tqdm(requests, desc="generate", disable=disable_tqdm)]


if register_model is not None:
    register_model("stlm")(StlmLM)


# ----------------------------------------------------------------------------
# a local task from the validation text: no network needed

def write_continuation_task(text, folder, n_docs):
    """
    folder/stlm_continuation.{jsonl,yaml}: each document is a passage of the
    text and four possible next pieces, the true one and DISTRACTORS taken from
    elsewhere in it (lm-eval reads local JSON through dataset_path: json).
    """
    span = CONTEXT_CHARS + CONTINUATION_CHARS
    # passages start anywhere, so they may overlap; more documents than the text holds side by
    # side would reuse the same passages again and again
    room = (len(text) - 1) // span
    if n_docs > room:
        fix = f"pass --task_docs={room} or fewer" if room else "prepare a larger validation split"
        raise UserError(f"the validation text has {len(text):,} characters, room for {room} "
                        f"documents of {span} characters: {fix}")
    rng = random.Random(1337)
    docs = []
    for _ in range(n_docs):
        start = rng.randrange(len(text) - span)
        truth = text[start + CONTEXT_CHARS:start + span]
        choices = [truth] + distractors(text, truth, rng)
        rng.shuffle(choices)
        docs.append(json.dumps({"context": text[start:start + CONTEXT_CHARS], "choices": choices,
                                "label": choices.index(truth)}) + "\n")
    jsonl = Path(folder) / f"{TASK_NAME}.jsonl"
    write_atomic(jsonl, "".join(docs), TASK_WRITE_FIX)
    write_task_yaml(folder, TASK_NAME, jsonl)


def distractors(text, truth, rng):
    """DISTRACTORS pieces of text as long as truth, all different from it and from each other."""
    pieces = []
    # a text too repetitive to hold that many different pieces would otherwise loop for ever
    for _ in range(1000 * DISTRACTORS):
        start = rng.randrange(len(text) - len(truth))
        piece = text[start:start + len(truth)]
        if piece != truth and piece not in pieces:
            pieces.append(piece)
            if len(pieces) == DISTRACTORS:
                return pieces
    raise UserError("the validation text repeats itself too much for a task with distinct choices")


def write_task_yaml(folder, name, jsonl):
    """A multiple-choice task over a JSONL of {context, choices, label}, as YAML (JSON is YAML)."""
    data_files = {"test": str(Path(jsonl).resolve())}
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": data_files},
            "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{context}}",
            "doc_to_target": "{{label}}", "doc_to_choice": "{{choices}}", "target_delimiter": "",
            "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True}
                            for metric in ("acc", "acc_norm")],
            "metadata": {"version": 1.0}}
    write_atomic(Path(folder) / f"{name}.yaml", json.dumps(task, indent=2) + "\n", TASK_WRITE_FIX)


def run_tasks(lm, tasks, include_path="", limit=0):
    """lm-eval's zero-shot results dict for the model on the named tasks."""
    lm_eval = require("lm_eval", "lm-eval")
    from lm_eval.tasks import TaskManager
    # lm-eval's own thousands of task files take a while to index: skip them when include_path
    # holds every task
    own_tasks_only = bool(include_path) and all(Path(include_path, f"{task}.yaml").is_file()
                                                for task in tasks)
    manager = TaskManager(include_path=include_path or None, include_defaults=not own_tasks_only)
    for task in tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=1)
            guess = f": did you mean {close[0]}?" if close else ""
            raise UserError(f"no lm-eval task {task!r}{guess} "
                            "(a local task's folder is passed with --include_path)")
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                      num_fewshot=0, limit=limit or None, bootstrap_iters=0,
                                      log_samples=False)
    return results["results"]


def check_counts(config):
    """Refuse the counts no evaluation can use, before anything is loaded."""
    for key in ("eval_tokens", "limit"):
        if getattr(config, key) < 0:
            raise UserError(f"--{key} must be 0 (all) or more, got {getattr(config, key)}")
    if config.make_task and config.task_docs < 1:
        raise UserError(f"--task_docs must be at least 1, got {config.task_docs}")


def main(argv=None):
    config = EvaluateConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    check_counts(config)
    set_threads(config.threads)
    # before the checkpoint: a missing GPU is not a damaged file
    config.device = pick_device(config.device)
    checkpoint = load_checkpoint(config.ckpt, config.device)
    name = config.dataset or checkpoint.get("train_config", {}).get("dataset")
    if not name:
        raise UserError("the checkpoint does not record its dataset: pass --dataset=NAME")
    dataset = dataset_for(checkpoint, name)
    if config.make_task:
        # 8 documents' worth of text for each document: passages drawn from it rarely overlap
        text = val_text(dataset, 8 * config.task_docs * (CONTEXT_CHARS + CONTINUATION_CHARS))
        write_continuation_task(text, config.make_task, config.task_docs)
        print(f"wrote {config.make_task}/{TASK_NAME}.yaml ({config.task_docs} documents; "
              f"chance {1 / (DISTRACTORS + 1):.0%}): "
              f"--tasks={TASK_NAME} --include_path={config.make_task}")
        return
    model = model_from_checkpoint(checkpoint).to(config.device)
    if not config.tasks:
        result = train.evaluate(model, dataset.val, dataset.token_bytes, model.config.block_size,
                                config.eval_tokens)
        print(f"{config.ckpt} on {name} val: loss {result['val_loss']:.4f} per token, "
              f"{result['val_bpb']:.4f} bits per byte")
        return
    lm = StlmLM(model=model, meta=checkpoint["data_meta"])
    results = run_tasks(lm, config.tasks.split(","), config.include_path, config.limit)
    for task, metrics in results.items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")


if __name__ == "__main__":
    run(main)
