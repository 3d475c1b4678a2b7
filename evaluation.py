"""
Evaluate a checkpoint: bits per byte on its own data, and lm-evaluation-harness tasks.

    python evaluation.py --ckpt=out/ckpt.pt                        # val bits per byte (train.evaluate, all of val)
    python evaluation.py --ckpt=out/ckpt.pt --tasks=hellaswag,arc_easy,blimp --limit=500   # needs network once
    python evaluation.py --ckpt=out/ckpt.pt --make_task=out/tasks  # a local multiple-choice task from val text
    python evaluation.py --ckpt=out/ckpt.pt --tasks=stlm_continuation --include_path=out/tasks

Bits per byte comes from train.evaluate, the project's one such function, over
the checkpoint's own dataset (or --dataset). Tasks run through an
lm-evaluation-harness model, `stlm` (the class StlmLM below, registered when
this file is imported), that scores with the model's own probabilities, so
byte, BPE and pooled byte models are compared on the same tasks:
- every model (bytes, bpe, hf:; a pooled model reads bytes) gives log p(continuation | context) summed
  over the continuation's tokens, split as lm-eval's Hugging Face model splits
  them (the whole text is tokenized; the context's token count marks the cut;
  trailing spaces of the context move to the continuation). On an exported
  model `lm_eval --model hf` therefore gives the same numbers.
- no model here has a start-of-text symbol, so an empty context (and every
  text of loglikelihood_rolling) is scored after a newline, EMPTY_CONTEXT.
- a context longer than the model's block_size is cut from the left; a
  continuation longer than that is scored in consecutive windows, as
  train.evaluate scores its validation text.
- generate_until decodes greedily (or at the task's temperature) until a
  stop string or max_gen_toks units.

`lm_eval`'s own command line cannot see a model class from a project that is
not pip-installed; this file is the command line (it takes --tasks,
--include_path, --num_fewshot, --limit), and from Python `import evaluation`
then `lm_eval.simple_evaluate(model="stlm", model_args="ckpt=out/ckpt.pt", ...)`.
Chance levels, for reading a tiny model's accuracy honestly: hellaswag 25%
(4 endings), arc_easy about 25% (4 choices, a few with 3 or 5), blimp 50%
(pairs of sentences), the local task 1 / (1 + DISTRACTORS) = 25%.
"""

import codecs
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import hardware
import train
from cli import UserError, parse_config, run
from export import require
from model import load_checkpoint, model_from_checkpoint
from tokenizer import encode, token_byte_table, unit_to_bytes

try:  # lm-eval is an optional extra: the bits-per-byte half of this file works without it
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    LM, register_model = object, None

EMPTY_CONTEXT = "\n"  # what a text with no context is scored after: the model has no start-of-text symbol
MAX_GEN_UNITS = 256  # generate_until's default limit, in tokens, when the task sets none
# the local task written by --make_task: a val passage, then its true next characters among distractors
TASK_NAME = "stlm_continuation"
CONTEXT_CHARS = 200
CONTINUATION_CHARS = 24
DISTRACTORS = 3  # other passages of the same length: chance is 1 / (DISTRACTORS + 1)


@dataclass
class EvaluateConfig:
    ckpt: str = "out/ckpt.pt"
    dataset: str = ""  # prepared data for bits per byte; empty = the one the checkpoint was trained on
    eval_tokens: int = 0  # validation tokens scored (from the start of val); 0 = all
    tasks: str = ""  # comma-separated lm-eval tasks (hellaswag, arc_easy, blimp, ...); empty = bits per byte only
    include_path: str = ""  # a folder of extra task YAMLs (what --make_task writes)
    num_fewshot: int = 0
    limit: int = 0  # documents per task; 0 = all
    make_task: str = ""  # write the local continuation task (YAML + JSONL from val text) into this folder
    task_docs: int = 200  # documents in that task
    seed: int = 1337
    device: str = "cpu"
    threads: int = 0  # CPU threads for torch; 0 = every core


# ----------------------------------------------------------------------------
# bits per byte: train.evaluate on the checkpoint's own data

def dataset_for(checkpoint, name=""):
    """The prepared dataset a checkpoint was trained on (or the one named), checked against its model."""
    name = name or checkpoint.get("train_config", {}).get("dataset")
    if not name:
        raise UserError("the checkpoint does not record its dataset: pass --dataset=NAME")
    config = checkpoint["model_config"]
    dataset = train.load_dataset(name, config["block_size"])
    for key, value in train.model_keys_from_data(dataset.meta).items():
        if config.get(key) != value:
            raise UserError(f"the checkpoint's {key} ({config.get(key)}) does not match {name}'s ({value}): "
                            "pass the --dataset it was trained on")
    return dataset


def val_text(dataset, n_bytes):
    """The first n_bytes of the validation text, as a string (a cut character is dropped)."""
    ids = torch.from_numpy(dataset.val[:2 * n_bytes].astype(np.int64))
    covered = dataset.token_bytes[ids].cumsum(0)  # bytes_gpt2's markers are tokens of no bytes
    n_tokens = int(torch.searchsorted(covered, n_bytes)) + 1
    table = token_byte_table(dataset.meta["tokenization"])
    data = b"".join(table[token] for token in ids[:n_tokens].tolist())
    return data[:n_bytes].decode("utf-8", errors="ignore")


# ----------------------------------------------------------------------------
# the lm-evaluation-harness model

class StlmLM(LM):
    """An lm-eval model scoring with a checkpoint's own probabilities: model_args ckpt=PATH[,device=cpu]."""

    def __init__(self, ckpt="out/ckpt.pt", device="cpu", model=None, meta=None, **lm_eval_settings):
        # lm_eval_settings: lm-eval also passes batch_size and max_batch_size; requests are scored one at a time
        require("lm_eval", "lm-eval")
        super().__init__()
        if model is None:  # tests pass a model and its data's meta directly
            checkpoint = load_checkpoint(ckpt, device)
            model, meta = model_from_checkpoint(checkpoint).to(device), checkpoint["data_meta"]
        self.model, self.meta = model.eval(), meta
        self.tokenization = meta["tokenization"]
        self.to_bytes = unit_to_bytes(self.tokenization)
        self.block_size = model.config.block_size

    def units(self, text):
        """Token ids (n,) of a text, as the model was trained on."""
        device = next(self.model.parameters()).device
        return torch.tensor(encode(self.tokenization, text), dtype=torch.long, device=device)

    @torch.no_grad()
    def score(self, units, first):
        """
        (log p of units[first:] given the units before them, whether each was
        the model's greedy choice). Scored in windows
        of at most block_size inputs, each target seeing as much context as fits.
        """
        logp, greedy, start = 0.0, True, first
        while start < len(units):
            end = min(len(units), start + self.block_size)  # targets start..end-1
            low = max(0, end - 1 - self.block_size)  # inputs low..end-2 predict low+1..end-1
            x, y = units[None, low:end - 1], units[None, low + 1:end]
            # the model's own head and loss, as GPT.forward applies them, on the scored positions only
            h = self.model.hidden_states(x)[:, start - 1 - low:]
            y = y[:, start - 1 - low:]
            logits = self.model.head(h)  # soft-capped, as GPT.forward does
            logp -= F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            greedy = greedy and bool((logits.argmax(-1) == y).all())
            start = end
        return logp, greedy

    def text_logp(self, text):
        """log p(text) as a whole, after EMPTY_CONTEXT; 0 for the empty text."""
        prefix, units = self.units(EMPTY_CONTEXT), self.units(text)
        return self.score(torch.cat([prefix, units]), len(prefix))[0]

    def loglikelihood_one(self, context, continuation):
        spaces = len(context) - len(context.rstrip())  # as lm-eval's hf model: " Paris" is one BPE token
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
        from tqdm import tqdm
        return [self.loglikelihood_one(*request.args)
                for request in tqdm(requests, desc="loglikelihood", disable=disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        from tqdm import tqdm
        return [self.text_logp(request.args[0])
                for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm)]

    @torch.no_grad()
    def generate_one(self, context, options):
        stops = options.get("until") or []
        stops = [stops] if isinstance(stops, str) else stops
        temperature = options.get("temperature", 0.0) if options.get("do_sample", False) else 0.0
        prompt = self.units(context or EMPTY_CONTEXT)[-self.block_size:]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        for unit in self.model.generate_stream(prompt[None], options.get("max_gen_toks", MAX_GEN_UNITS),
                                               temperature=temperature):
            text += decoder.decode(self.to_bytes(unit))
            if any(stop in text for stop in stops):
                break
        text += decoder.decode(b"", final=True)
        for stop in stops:
            text = text.split(stop)[0]
        return text

    def generate_until(self, requests, disable_tqdm=False):
        from tqdm import tqdm
        return [self.generate_one(*request.args) for request in tqdm(requests, desc="generate", disable=disable_tqdm)]


if register_model is not None:
    register_model("stlm")(StlmLM)


# ----------------------------------------------------------------------------
# a local task from the validation text: no network needed

def write_continuation_task(text, folder, n_docs, seed):
    """
    folder/stlm_continuation.{jsonl,yaml}: each document is a passage of the
    text and four possible next pieces, the true one and DISTRACTORS taken from
    elsewhere in it (lm-eval reads local JSON through dataset_path: json).
    """
    span = CONTEXT_CHARS + CONTINUATION_CHARS
    if len(text) < 2 * span:
        raise UserError(f"the validation text has {len(text)} characters, too few for a task ({2 * span} needed)")
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{TASK_NAME}.jsonl", "w") as f:
        for _ in range(n_docs):
            start = rng.randrange(len(text) - span)
            truth = text[start + CONTEXT_CHARS:start + span]
            choices = [truth]
            while len(choices) < DISTRACTORS + 1:
                other = rng.randrange(len(text) - CONTINUATION_CHARS)
                candidate = text[other:other + CONTINUATION_CHARS]
                if candidate not in choices:
                    choices.append(candidate)
            rng.shuffle(choices)
            f.write(json.dumps({"context": text[start:start + CONTEXT_CHARS], "choices": choices,
                                "label": choices.index(truth)}) + "\n")
    write_task_yaml(folder, TASK_NAME, folder / f"{TASK_NAME}.jsonl")


def write_task_yaml(folder, name, jsonl):
    """A multiple-choice task over a local JSONL file of {context, choices, label} (JSON is valid YAML)."""
    data_files = {"test": str(Path(jsonl).resolve())}
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": data_files},
            "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{context}}",
            "doc_to_target": "{{label}}", "doc_to_choice": "{{choices}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
    (Path(folder) / f"{name}.yaml").write_text(json.dumps(task, indent=2) + "\n")


def run_tasks(lm, tasks, include_path="", num_fewshot=0, limit=0):
    """lm-eval's results dict for the model on the named tasks; only include_path's tasks when it is given."""
    lm_eval = require("lm_eval", "lm-eval")
    from lm_eval.tasks import TaskManager
    # lm-eval's own thousands of task files take a while to index: skip them when include_path holds every task
    own_tasks_only = bool(include_path) and all(Path(include_path, f"{task}.yaml").is_file() for task in tasks)
    manager = TaskManager(include_path=include_path or None, include_defaults=not own_tasks_only)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                   limit=limit or None, bootstrap_iters=0, log_samples=False)["results"]


def main(argv=None):
    config = EvaluateConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    config.device = hardware.pick_device(config.device)  # before the checkpoint: a missing GPU is not a damaged file
    torch.set_num_threads(config.threads or torch.get_num_threads())
    checkpoint = load_checkpoint(config.ckpt, config.device)
    dataset = dataset_for(checkpoint, config.dataset)
    if config.make_task:
        text = val_text(dataset, 8 * config.task_docs * (CONTEXT_CHARS + CONTINUATION_CHARS))
        write_continuation_task(text, config.make_task, config.task_docs, config.seed)
        print(f"wrote {config.make_task}/{TASK_NAME}.yaml ({config.task_docs} documents; chance "
              f"{1 / (DISTRACTORS + 1):.0%}): --tasks={TASK_NAME} --include_path={config.make_task}")
        return
    model = model_from_checkpoint(checkpoint).to(config.device)
    if not config.tasks:
        result = train.evaluate(model, dataset.val, dataset.token_bytes, model.config.block_size, config.eval_tokens)
        print(f"{config.ckpt} on {checkpoint.get('train_config', {}).get('dataset', config.dataset)} val: "
              f"loss {result['val_loss']:.4f} per token, {result['val_bpb']:.4f} bits per byte")
        return
    lm = StlmLM(model=model, meta=checkpoint["data_meta"])
    results = run_tasks(lm, config.tasks.split(","), config.include_path, config.num_fewshot, config.limit)
    for task, metrics in results.items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")


if __name__ == "__main__":
    run(main)
