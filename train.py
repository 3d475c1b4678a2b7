"""
Train a GPT on the binaries written by data/prepare.py.

    python train.py                                   # cpu-tiny on data/default_bytes
    python train.py --preset=stlm-10m --dataset=default_bpe --device=cuda
    python train.py --resume                          # continue out/ckpt.pt where it stopped
    python train.py --help                            # every key, with its default

Any GPTConfig key (--n_layer=6, --pos=learned, ...) overrides the preset; --help
shows the default preset's values. Validation reports bits per byte, the one
metric that compares models across tokenizations. Each evaluation writes
out_dir/ckpt.pt atomically, with all a resume needs; Ctrl-C and SIGTERM write
one at the next step boundary. The run folder is kept safe: one run at a time,
no run clobbered, no resume on other data, no diverged model saved.
distill.py reuses the loop (configure, setup, train_loop) with its own loss.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import UserError, parse_config, pick_device, run, set_threads
from model import GPT, GPTConfig, load_checkpoint, preset_config, save_checkpoint
from optim import OPTIMIZERS, TimeBudget, learning_rate, make_optimizer
from tokenizer import TOKEN_BYTES_NAME

DATA_DIR = Path(__file__).resolve().parent / "data"  # where data/prepare.py writes datasets
CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = "run.lock"
# the gradient norm a step may take (nanoGPT's): one freak batch cannot throw the weights far
GRAD_CLIP = 1.0
# what a resume may change: how long it goes on, how often it reports, where its data (the same data)
# and folder are, and how this machine runs it; any other key is the run's, a new value another run
RESUME_MAY_CHANGE = ("max_iters", "max_seconds", "eval_interval", "log_interval", "dataset", "out_dir",
                     "device", "threads", "compile", "bf16")
# keys a resume takes from its own command line, never from the checkpoint: where files are written
# (a copied run, or a crafted file, must not write where it came from) and what this machine has
LOCAL_KEYS = ("out_dir", "resume", "overwrite", "device", "threads")


@dataclass
class TrainConfig:
    # data and the run's folder
    dataset: str = "default_bytes"  # a folder under data/ (or any path) written by data/prepare.py
    preset: str = "cpu-tiny"  # a named shape from model.py; GPTConfig keys override it
    out_dir: str = "out"
    resume: bool = False  # continue the run in out_dir from its checkpoint
    overwrite: bool = False  # a fresh run may replace the run already in out_dir
    # optimisation: the fastest recipe measured for cpu-tiny on a CPU (README); nanoGPT's is
    # --optimizer=adamw --batch_size=12 --max_iters=2000 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=100
    # (Muon's Newton-Schulz costs the same per step at any batch: fewer, larger steps amortize it)
    batch_size: int = 24
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 700  # also where the cosine reaches min_lr (a longer resume keeps that)
    max_seconds: float = 0.0  # a time budget that the schedule follows, max_iters ignored; 0 = off
    # what max_seconds counts: wall, or cpu (this process's CPU time: fair on a shared machine)
    budget_clock: str = "wall"
    learning_rate: float = 3e-3  # AdamW's: embeddings, head, norms, biases (all with adamw)
    min_lr: float = 3e-4  # the cosine schedule ends here
    warmup_iters: int = 50
    weight_decay: float = 0.1
    optimizer: str = "muon"  # muon (Muon for the core's matrices, AdamW for the rest) | adamw
    muon_lr: float = 0.03  # Muon's (times sqrt(rows / cols) for tall matrices), scheduled too
    # evaluation and logging
    eval_interval: int = 500
    eval_tokens: int = 131072  # validation tokens per evaluation (from the start of val); 0 = all
    log_interval: int = 10
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0 = the cores idle at the start (see cli.set_threads)
    compile: bool = False  # torch.compile: faster steps after a slow first one
    bf16: bool = False  # bf16 autocast on CPU too (CUDA always uses it)
    seed: int = 1337


# ----------------------------------------------------------------------------
# configuration: a fresh run's from the command line, a resumed run's from its checkpoint

def configure(argv, extra_configs=(), usage=__doc__):
    """
    Train and model configs from the command line; on --resume both come from
    the checkpoint, with what a resume may change. extra_configs (a caller's
    own dataclasses, as distill.py has) are filled from the same arguments.
    Returns (config, model_config, checkpoint or None).
    """
    # --help shows the default preset's model keys, what `python train.py` trains
    config, model_config = TrainConfig(), preset_config(TrainConfig.preset)
    assigned = parse_config([config, model_config, *extra_configs], argv, usage=usage,
                            left_out={"vocab_size": "is set by the data (its meta.json)"})
    checkpoint = None
    if config.resume:
        checkpoint = load_run(config.out_dir)
        check_resume_changes(assigned, checkpoint)
        # the stored run's settings, but the local keys and what this command line changes
        keys = {f.name for f in dataclasses.fields(TrainConfig)}
        stored = {k: v for k, v in checkpoint["train_config"].items() if k in keys and k not in LOCAL_KEYS}
        config = TrainConfig(**{**stored, **{k: v for k, v in assigned.items() if k in keys}})
        model_config = GPTConfig(**checkpoint["model_config"])
        check_resume_step(config, checkpoint)
    else:
        model_keys = {f.name for f in dataclasses.fields(GPTConfig)}
        model_config = preset_config(config.preset, **{k: v for k, v in assigned.items() if k in model_keys})
    check_train_config(config)
    return config, model_config, checkpoint


def check_train_config(config):
    """Refuse values that would crash later or train silently wrong, naming the key."""
    for key in ("batch_size", "grad_accum", "max_iters", "log_interval", "eval_interval"):
        if getattr(config, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(config, key)}")
    for key in ("warmup_iters", "eval_tokens"):
        if getattr(config, key) < 0:
            raise UserError(f"--{key} must be 0 or more, got {getattr(config, key)}")
    # torch.manual_seed takes 64 bits
    if not 0 <= config.seed < 2**64:
        raise UserError(f"--seed must be 0 up to 2**64 - 1, got {config.seed}")
    for key in ("learning_rate", "muon_lr"):
        if not (math.isfinite(getattr(config, key)) and getattr(config, key) > 0):
            raise UserError(f"--{key} must be a positive number, got {getattr(config, key)}")
    for key in ("min_lr", "weight_decay", "max_seconds"):
        if not (math.isfinite(getattr(config, key)) and getattr(config, key) >= 0):
            raise UserError(f"--{key} must be a number >= 0, got {getattr(config, key)}")
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer={config.optimizer} is not one of {', '.join(OPTIMIZERS)}")
    if config.budget_clock not in TimeBudget.CLOCKS:
        raise UserError(f"--budget_clock={config.budget_clock} is not one of "
                        f"{', '.join(TimeBudget.CLOCKS)}")
    if not config.out_dir:
        raise UserError("--out_dir is empty: name the folder the run writes to (default: out)")
    if config.resume and config.overwrite:
        raise UserError("--resume continues the run in --out_dir, --overwrite replaces it: pass one")


def load_run(out_dir):
    """The checkpoint of the run in out_dir; one line if there is none, or it holds only a model."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"no run to resume in {out_dir} (it has no {CHECKPOINT_NAME}): start one without "
                        "--resume, or pass the --out_dir of the run to continue")
    checkpoint = load_checkpoint(path)
    missing = [k for k in ("train_config", "optimizer", "step", "seconds", "decay_iters", "data_meta")
               if k not in checkpoint]
    if missing:
        raise UserError(f"{path} holds a model but no run to continue (no {missing[0]!r}: another tool, or "
                        "an older train.py, wrote it): start a new run in another --out_dir")
    return checkpoint


def check_resume_changes(assigned, checkpoint):
    """A resume continues its run: a key it may not change must, if given, be the stored value."""
    stored = {**checkpoint["model_config"], **checkpoint["train_config"]}
    for key, value in assigned.items():
        if key in stored and key not in (*RESUME_MAY_CHANGE, *LOCAL_KEYS) and value != stored[key]:
            may_change = ", ".join("--" + k for k in RESUME_MAY_CHANGE)
            raise UserError(f"--{key}={value} is not the resumed run's {stored[key]!r}: a resume may change "
                            f"only {may_change}; to train with another --{key}, start a new run in another "
                            "--out_dir")


def check_resume_step(config, checkpoint):
    if not config.max_seconds and config.max_iters < checkpoint["step"]:
        raise UserError(f"--max_iters={config.max_iters} is below the checkpoint's step "
                        f"{checkpoint['step']}: pass a larger --max_iters to train on, or none to keep "
                        f"{checkpoint['train_config']['max_iters']}")


def check_same_data(checkpoint_meta, meta, dataset_name):
    """A resume goes on with the data its model was trained on, or it is silently another run."""
    # where the files came from ("sources") is not what the data is: a copy elsewhere resumes
    stored, current = ({k: v for k, v in m.items() if k != "sources"} for m in (checkpoint_meta, meta))
    differences = [f"{k} {stored.get(k)!r} -> {current.get(k)!r}"
                   for k in sorted(stored.keys() | current.keys()) if stored.get(k) != current.get(k)]
    if differences:
        raise UserError(f"{dataset_name} is not the data the checkpoint was trained on "
                        f"({'; '.join(differences[:3])}): resume on that data, or start a new run with "
                        "--out_dir")


# ----------------------------------------------------------------------------
# the loop's state and the checkpoint

@dataclass
class TrainState:
    decay_iters: int  # where the cosine reaches min_lr: the first run's max_iters, kept by resumes
    step: int = 0  # optimizer steps done; with the seed it fixes the data and RNG position
    seconds: float = 0.0  # seconds spent in the loop so far (what --max_seconds budgets)
    # the run folder's lock (setup takes it), held while this state lives; not part of a checkpoint
    lock: object = dataclasses.field(default=None, repr=False, compare=False)


def make_checkpoint(model, optimizer, config, state, meta):
    return {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.config),
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(config),
        "step": state.step,
        "seconds": state.seconds,
        "decay_iters": state.decay_iters,
        "data_meta": meta,
    }


def restore(checkpoint, model, optimizer, state):
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    state.step, state.seconds = checkpoint["step"], checkpoint["seconds"]
    state.decay_iters = checkpoint["decay_iters"]


# ----------------------------------------------------------------------------
# data

class TokenStream:
    """
    The token ids of one split: its shard files, memmapped, read as one array.
    len(), a slice, an array of positions and np.asarray work as on a numpy
    array, so windows drawn across the shards are the windows the same tokens
    in one file give. A slice within one shard is a view; across shards, a copy.
    """

    def __init__(self, paths, dtype):
        self.shards = [np.memmap(path, dtype=dtype, mode="r") for path in paths]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])  # each shard's first position
        self.dtype = np.dtype(dtype)

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            index = np.arange(start, stop, step)
        positions = np.asarray(index)
        if len(self.shards) == 1:
            return self.shards[0][positions]
        positions = np.where(positions < 0, positions + len(self), positions)
        if positions.size and not 0 <= positions.min() <= positions.max() < len(self):
            raise IndexError(f"position out of range for {len(self)} tokens")
        # each position's shard: the last one starting at or before it (empty shards start where the next does)
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        out = np.empty(positions.shape, dtype=self.dtype)
        # the shards touched, found by counting (np.unique would sort every position)
        for k in np.flatnonzero(np.bincount(shard.ravel(), minlength=len(self.shards))):
            at = shard == k
            out[at] = self.shards[k][positions[at] - self.starts[k]]
        return out

    def _range(self, start, stop):
        pieces = [shard[max(start - first, 0):stop - first]
                  for shard, first in zip(self.shards, self.starts) if first < stop and start < first + len(shard)]
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)


@dataclass
class Dataset:
    meta: dict
    train: TokenStream  # token ids
    val: TokenStream
    token_bytes: torch.Tensor  # bytes of text each token id stands for (bits per byte)


def load_dataset(name, block_size):
    """A prepared dataset's token arrays, checked against its meta.json and the context length."""
    folder = Path(name) if Path(name).is_dir() else DATA_DIR / name
    meta = read_meta(folder)
    train, val = (read_split(folder, split, meta, block_size) for split in ("train", "val"))
    return Dataset(meta, train, val, read_token_bytes(folder, meta))


def prepare_again(folder):
    return f"run python data/prepare.py again for {folder.name} (see its --help)"


def read_meta(folder):
    """A dataset's meta.json, refused in one line when it is missing, not JSON or incomplete."""
    path = folder / "meta.json"
    if not path.is_file():
        raise UserError(f"no prepared dataset at {folder}: run python data/prepare.py (see its --help)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): {prepare_again(folder)}") from None
    # what loading relies on, as data/prepare.py writes it
    checks = {"tokenization": lambda v: isinstance(v, str), "dtype": is_unsigned_dtype,
              "vocab_size": lambda v: isinstance(v, int) and v >= 1,
              "train_tokens": lambda v: isinstance(v, int) and v >= 0,
              "val_tokens": lambda v: isinstance(v, int) and v >= 0}
    missing = [key for key in checks if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise UserError(f"{path} is incomplete (no {missing[0]!r}): {prepare_again(folder)}")
    for key, valid in checks.items():
        if not valid(meta[key]):
            raise UserError(f"{path} holds {key} {meta[key]!r}, which no prepared dataset has: "
                            f"{prepare_again(folder)}")
    return meta


def is_unsigned_dtype(name):
    """Whether name is a numpy unsigned integer dtype, what data/prepare.py stores token ids as."""
    try:
        return np.dtype(name).kind == "u"
    except TypeError:
        return False


def read_split(folder, split, meta, block_size):
    """A split's TokenStream over the shards meta.json lists, each checked against its token count."""
    if "shards" not in meta:
        raise UserError(f"{folder} was prepared by an older data/prepare.py (one file per split, no shard "
                        f"list): {prepare_again(folder)}")
    dtype, paths = np.dtype(meta["dtype"]), []
    for shard in meta["shards"][split]:
        path, tokens = folder / shard["file"], shard["tokens"]
        size = path.stat().st_size if path.is_file() else None
        if size != tokens * dtype.itemsize:
            found = "is missing" if size is None else f"holds {size:,} bytes"
            raise UserError(f"{path} {found}, but meta.json says {tokens:,} tokens of {dtype.name} "
                            f"({tokens * dtype.itemsize:,} bytes): {prepare_again(folder)}")
        paths.append(path)
    tokens = meta[f"{split}_tokens"]
    if tokens < block_size + 1:
        raise UserError(f"{folder.name}'s {split} split has {tokens} tokens, fewer than the context needs "
                        f"({block_size} + 1): use a larger corpus or a smaller --block_size")
    return TokenStream(paths, dtype)


def read_token_bytes(folder, meta):
    """token_bytes.npy: the bytes of text each token id stands for, one entry per id."""
    path = folder / TOKEN_BYTES_NAME
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        found = "is missing" if not path.is_file() else f"is not readable ({e.__class__.__name__})"
        raise UserError(f"{path} {found}: {prepare_again(folder)}") from None
    if table.shape != (meta["vocab_size"],) or table.dtype.kind not in "iu":
        raise UserError(f"{path} holds {table.dtype} of shape {table.shape}, not one count per token id "
                        f"of the vocabulary ({meta['vocab_size']}): {prepare_again(folder)}")
    return torch.from_numpy(table.astype(np.int64))


def model_keys_from_data(meta):
    """The model settings the data decides: the vocabulary (a pooled model checks it is bytes)."""
    return {"vocab_size": meta["vocab_size"]}


def get_batch(data, batch_size, block_size, generator, device):
    """
    Random windows of data (a TokenStream, or any 1-d array): inputs (B, T) and
    the same windows shifted by one token as targets.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    windows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------
# evaluation: bits per byte, the one quality metric

def predicted_bytes(y, token_bytes):
    """Bytes of text the targets stand for: each token id's bytes."""
    return token_bytes[y.cpu()].sum().item()


@torch.no_grad()
def evaluate(model, data, token_bytes, block_size, max_tokens=0, batch_size=64,
             autocast=contextlib.nullcontext()):
    """
    Validation loss per token and bits per byte, the number that compares models
    across tokenizations:

        bits per byte = (sum of -ln p over every predicted unit) / (ln 2 * UTF-8 bytes those units cover)

    A unit is a byte (for a bytes or a pooled byte model) or a BPE token;
    whatever the unit, the numerator is the code length of the same text, and
    the denominator its size. token_bytes (from data/prepare.py) says how many
    bytes each token id covers. Windows are consecutive and non-overlapping
    from the start of data, so every call scores the same tokens: numbers
    from different steps and runs compare exactly.
    """
    n_windows = (len(data) - 1) // block_size
    if max_tokens:
        n_windows = max(1, min(n_windows, max_tokens // block_size))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * block_size
        windows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
        windows = windows.to(device)
        x, y = windows[:, :-1], windows[:, 1:]
        with autocast:
            _, nats = model(x, y, reduction="sum")
        total_nats += nats.item()
        total_tokens += y.size(0) * y.size(1)
        total_bytes += predicted_bytes(y, token_bytes)
    model.train(was_training)
    return {"val_loss": total_nats / total_tokens, "val_bpb": total_nats / (math.log(2) * total_bytes)}


def language_model_loss(model, x, y):
    """The default loss: next-token cross-entropy. distill.py passes its own, of this signature."""
    _, loss = model(x, y)
    return loss, {}


# ----------------------------------------------------------------------------
# randomness: derived from (seed, step, micro-batch), never carried as state

def micro_batch_seed(seed, step, micro_batch):
    """
    The seed of one micro-batch's data and dropout. Because every random draw
    is a function of where it happens, a resumed run, or a run split over any
    number of processes, draws exactly what an uninterrupted single process
    would: the step is the whole data position.
    """
    return int(np.random.SeedSequence([seed, step, micro_batch]).generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------
# the loop

def train_loop(model, optimizer, dataset, config, state, device, loss_fn=language_model_loss,
               batch_fn=get_batch, dist=None):
    """
    Optimizer steps from state.step to max_iters (or to the end of the time budget), evaluating
    and saving every eval_interval steps and at the end; returns the last evaluation. distill.py
    passes its own batch_fn(data, batch_size, block_size, generator, device) -> (x, y) and
    loss_fn(model, x, y) -> (loss, extra metrics); y may then carry a teacher's targets.
    """
    dist, raw_model, block_size = dist or Distributed(), model, model.config.block_size
    model, eval_model = wrap_model(model, config, device, dist)
    autocast = autocast_for(device, config.bf16)
    budget = TimeBudget(config.max_seconds, state.seconds, config.budget_clock)
    timer, result = Throughput(config.batch_size * config.grad_accum * block_size, state.step), None
    raw_model.set_step(state.step)
    model.train()
    with (RunFolder(raw_model, optimizer, config, state, dataset.meta, dist.is_main) as folder,
          StopRequests(folder) as stop, progress_bar(config, state, budget, dist) as progress):
        while budget or state.step < config.max_iters:
            lr, last = schedule(state, config, budget, dist)
            set_learning_rate(optimizer, lr)
            # the step's micro-batches: get each batch, its loss, and its gradients
            metrics = accumulate_gradients(model, block_size, dataset, config, state, device, dist, loss_fn,
                                           batch_fn, autocast)
            check_loss(metrics, config, state, folder)
            torch.nn.utils.clip_grad_norm_(trained_parameters(optimizer), GRAD_CLIP, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step, state.seconds = state.step + 1, budget.tick()
            raw_model.set_step(state.step)
            progress.update(1)
            if state.step % config.log_interval == 0 or last:
                log_training(folder, progress, state.step, mean_metrics(metrics, config, dist), lr, timer)
            if (state.step % config.eval_interval == 0 or last) and dist.is_main:
                result = evaluate_and_save(eval_model, block_size, dataset, config, state, folder, autocast)
                # evaluation counts against the budget, not against training throughput
                state.seconds = budget.tick(was_step=False)
                timer.restart(state.step)
            if last:
                break
            if stop.requested(dist, device):
                stop.save_and_exit(progress)
    return result


def progress_bar(config, state, budget, dist):
    """Steps done of max_iters (of an unknown total under a time budget), on the main process."""
    return tqdm(total=None if budget else config.max_iters, initial=state.step, unit="step",
                dynamic_ncols=True, disable=not dist.is_main)


def wrap_model(model, config, device, dist):
    """(model to train, model to evaluate): compiled if asked, under DDP with several processes."""
    if config.compile:
        model = torch.compile(model)
    # evaluation runs on the main process only, outside DDP's collective calls
    eval_model = model
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    return model, eval_model


def autocast_for(device, bf16):
    """bf16 autocast on CUDA, and on a CPU with --bf16; else none (float32)."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def schedule(state, config, budget, dist):
    """
    This step's learning rate, and whether it is the last: the step that
    reaches max_iters or, under a time budget, the one predicted to reach the
    budget, which the schedule takes at min_lr.
    """
    spent = budget.spent_after_next_step(dist)
    last = spent >= 1.0 if spent is not None else state.step + 1 >= config.max_iters
    return learning_rate(state.step, config, state.decay_iters, spent), last


def set_learning_rate(optimizer, lr):
    """The schedule's rate for every group, times its lr_scale (Muon's groups run at muon_lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def accumulate_gradients(model, block_size, dataset, config, state, device, dist, loss_fn, batch_fn,
                         autocast):
    """
    Forward and backward over this process's share of the step's micro-batches
    (grad_accum / world_size of them); returns the loss and extra metrics
    summed over them. Gradients are averaged across processes once, in the
    last micro-batch's backward.
    """
    local_accum = config.grad_accum // dist.world_size
    totals = {}
    for i in range(local_accum):
        seed = micro_batch_seed(config.seed, state.step, dist.rank * local_accum + i)
        generator = torch.Generator().manual_seed(seed)
        x, y = batch_fn(dataset.train, config.batch_size, block_size, generator, device)
        # dropout's randomness, from the same seed
        torch.manual_seed(seed)
        sync = dist.world_size == 1 or i == local_accum - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast:
                loss, extra = loss_fn(model, x, y)
            (loss / local_accum).backward()
        for key, value in {"loss": loss, **extra}.items():
            totals[key] = totals.get(key, 0.0) + torch.as_tensor(value).detach().float()
    return totals


def check_loss(metrics, config, state, folder):
    """Stop, saving nothing, at the first step whose loss is not finite (its weights are good)."""
    if not torch.isfinite(metrics["loss"]):
        loss = metrics["loss"].item() / config.grad_accum
        raise diverged("training loss", loss, state.step + 1, folder.saved())


def trained_parameters(optimizer):
    """Every parameter the optimizer trains (distill.py's projection too): what clipping covers."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def mean_metrics(totals, config, dist):
    """The step's mean of each summed metric, over all micro-batches of all processes."""
    means = torch.stack(list(totals.values())) / config.grad_accum
    # all_reduce sums the processes' shares
    if dist.world_size > 1:
        torch.distributed.all_reduce(means)
    return dict(zip(totals, means.tolist()))


def log_training(folder, progress, step, metrics, lr, timer):
    """A training record (the step's mean metrics, learning rate, throughput): log and bar."""
    record = {"step": step, **metrics, "lr": lr, "tokens_per_s": round(timer.rate(step))}
    folder.log(record)
    progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,}")


def evaluate_and_save(model, block_size, dataset, config, state, folder, autocast):
    """Evaluate, log and checkpoint (on the main process); a non-finite loss stops the run."""
    result = evaluate(model, dataset.val, dataset.token_bytes, block_size, config.eval_tokens,
                      autocast=autocast)
    if not math.isfinite(result["val_loss"]):
        raise diverged("validation loss", result["val_loss"], state.step, folder.saved())
    folder.log({"step": state.step, "seconds": round(state.seconds, 2), **result})
    tqdm.write(f"step {state.step}: val loss {result['val_loss']:.4f}, "
               f"val {result['val_bpb']:.4f} bits per byte")
    folder.save()
    return result


class Throughput:
    """Training tokens per second between two log lines, evaluation and checkpoints left out."""

    def __init__(self, tokens_per_step, step):
        self.tokens_per_step = tokens_per_step
        self.restart(step)

    def restart(self, step):
        self.t0, self.step0 = time.perf_counter(), step

    def rate(self, step):
        now = time.perf_counter()
        tokens_per_s = self.tokens_per_step * (step - self.step0) / (now - self.t0)
        self.t0, self.step0 = now, step
        return tokens_per_s


# ----------------------------------------------------------------------------
# the run's folder: one run at a time, the checkpoint and the metrics log

def lock_run_folder(out_dir):
    """
    An exclusive lock on out_dir/run.lock, or a one-line refusal naming the
    process that holds it: two runs in one folder would interleave their logs
    and keep only one's checkpoint. The lock lasts while the returned file is
    open; the system drops it when the process ends, however it ends, so a
    lock file left behind blocks nothing. Without fcntl (Windows) there is no
    lock.
    """
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(out_dir) / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open: created if need be, and not truncated, which would erase the holder's PID
        lock = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    except OSError as e:
        raise unwritable(out_dir, e) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UserError(f"another run (PID {holder}) is training in {out_dir}: wait for it to end, "
                        "or pick another --out_dir") from None
    except OSError:
        # a file system without locks: go on without one, as on Windows
        return lock
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def unwritable(out_dir, error):
    return UserError(f"cannot write in --out_dir={out_dir} ({error.strerror or error}): "
                     "pick a folder you can write to")


def check_fresh_out_dir(config):
    """A fresh run must not silently replace another run's checkpoint and mix into its log."""
    out_dir = Path(config.out_dir)
    used = [name for name in (CHECKPOINT_NAME, METRICS_NAME) if (out_dir / name).exists()]
    if used and not config.overwrite:
        raise UserError(f"{out_dir} already holds a run ({used[0]}): continue it with --resume, "
                        f"replace it with --overwrite, or pick another --out_dir")


class RunFolder:
    """
    What a run writes in out_dir, on the main process only: metrics.jsonl, one
    JSON record per line, and checkpoints of the model, optimizer and loop
    state it was given. Opened at step s, the log keeps only its records up to
    s: a fresh run starts it empty, and a resumed one drops what was logged
    after its checkpoint, so each step is there once. It knows the step of the
    checkpoint on disk, which a run that stops without saving names. The loop
    holds it as a context: its end lets go of the folder's lock (from setup).
    """

    def __init__(self, model, optimizer, config, state, meta, is_main):
        self.model, self.optimizer, self.config, self.state = model, optimizer, config, state
        self.meta, self.is_main = meta, is_main
        self.checkpoint_path = Path(config.out_dir) / CHECKPOINT_NAME
        self.metrics_path = Path(config.out_dir) / METRICS_NAME
        self.saved_step = state.step if config.resume else None
        if is_main:
            self._keep_records_up_to(state.step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # the run is over: the folder is free for the next one
        if self.state.lock is not None:
            self.state.lock.close()
            self.state.lock = None

    def _keep_records_up_to(self, step):
        tmp = self.metrics_path.with_name(METRICS_NAME + ".tmp")
        try:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
            tmp.write_text("".join(line + "\n" for line in lines if logged_step(line) <= step))
            tmp.replace(self.metrics_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise unwritable(self.config.out_dir, e) from None

    def log(self, record):
        if not self.is_main:
            return
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"could not write {self.metrics_path} ({e.strerror or e}): the last "
                            "checkpoint beside it is kept; make room (a full disk?) and continue with "
                            "--resume") from None

    def save(self):
        """Checkpoint the run, atomically; never over a good checkpoint with a diverged model."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise diverged("model", "not finite (NaN or infinity in its weights)", self.state.step,
                           self.saved())
        checkpoint = make_checkpoint(self.model, self.optimizer, self.config, self.state, self.meta)
        save_checkpoint(checkpoint, self.checkpoint_path)
        self.saved_step = self.state.step

    def saved(self):
        """The checkpoint on disk and its step, or None while this run has written none."""
        return None if self.saved_step is None else f"{self.checkpoint_path}, step {self.saved_step}"


def logged_step(line):
    """The step of one line of metrics.jsonl; infinity for a line cut short by a kill mid-write."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# ----------------------------------------------------------------------------
# stopping: on a signal, at a step boundary; on divergence, without saving

class StopRequests:
    """
    While active, SIGINT (Ctrl-C) and SIGTERM (what schedulers, laptops and
    torchrun send) set a flag instead of raising in the middle of a step; the
    loop asks `requested()` between steps, and then `save_and_exit()`. A
    second Ctrl-C stops at once, maybe mid-step, so nothing is saved: the user
    insists. Only the main thread may install handlers; elsewhere signals keep
    their usual behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, folder):
        self.folder, self.signum, self.previous = folder, None, {}

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self.previous = {}
        return self

    def __exit__(self, kind, error, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if kind is KeyboardInterrupt:
            print("interrupted twice: stopped without saving; the last checkpoint: "
                  f"{self.folder.saved() or 'none written'}")
            sys.exit(130)

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, dist, device):
        """Whether to stop now; under DDP all processes stop at the step any one was signalled."""
        if dist.world_size == 1:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flag.item()) or None
        return self.signum is not None

    def save_and_exit(self, progress):
        """Save the step just done (unless saved) and exit with the shell's status for the signal."""
        # the bar first, so that it does not overwrite the message
        progress.close()
        folder = self.folder
        if folder.is_main:
            if folder.saved_step != folder.state.step:
                folder.save()
            print(f"stopped by {signal.Signals(self.signum).name} at step {folder.state.step}: "
                  f"saved {folder.checkpoint_path}; continue with --resume")
        sys.exit(128 + self.signum)


def diverged(what, value, step, last_saved):
    """The one-line error of a run whose loss (or weights) stopped being finite: nothing is saved."""
    kept = "no checkpoint was written"
    if last_saved:
        kept = f"the last good checkpoint ({last_saved}) is kept"
    shown = value if isinstance(value, str) else ("nan" if math.isnan(value) else f"{value}")
    return UserError(f"training diverged at step {step}: the {what} is {shown}; {kept}: "
                     "lower --learning_rate (or --warmup_iters longer) and start again")


# ----------------------------------------------------------------------------
# processes, device and memory

@dataclass
class Distributed:
    rank: int = 0  # this process among all of them
    local_rank: int = 0  # this process on its machine: picks the GPU
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0  # the only process that logs, evaluates and writes checkpoints


def init_distributed(device):
    """Join the process group when torchrun started us (it sets RANK and friends); else one process."""
    if "RANK" not in os.environ:
        return Distributed()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return Distributed(torch.distributed.get_rank(), int(os.environ["LOCAL_RANK"]),
                       torch.distributed.get_world_size())


def use_device(config, dist, device):
    """Threads for this process, and on CUDA its GPU and TF32 matmuls; returns the device."""
    set_threads(config.threads, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if device == "cpu":
        return device
    if dist.world_size > 1:
        device = f"cuda:{dist.local_rank}"
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device


def training_memory_bytes(config, batch_size):
    """
    A rough upper bound on training memory in float32, in two parts. The
    parameters: 4 floats each (weights, gradients, AdamW's two moments). The
    activations the backward pass keeps: 34 floats of width n_embd per token
    and block application (attention inputs and outputs, norms, a 4x FFN and
    the gradients passing through them), and the logits with their gradient.
    Attention runs in fused kernels that keep no block_size x block_size matrix.
    """
    width, tokens = config.n_embd, batch_size * config.block_size
    params = 12 * config.n_layer * width * width + (config.vocab_size + config.block_size) * width
    activations = tokens * (config.n_layer * config.block_repeat * 34 * width + 2 * config.vocab_size)
    return {"parameters": 4 * 4 * params, "activations": 4 * activations}


def available_memory_bytes(device):
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    # Linux: what can be had without swapping
    try:
        with open("/proc/meminfo") as f:
            return int(next(line.split()[1] for line in f if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config, batch_size, device):
    """Refuse a shape that cannot train here, naming what takes the memory: not swap at step 0."""
    need, have = training_memory_bytes(config, batch_size), available_memory_bytes(device)
    if sum(need.values()) <= have:
        return
    if need["parameters"] >= need["activations"]:
        cause = (f"the parameters (--n_embd={config.n_embd}, --n_layer={config.n_layer}) take "
                 f"{need['parameters'] / 2**30:.1f} GiB with their gradients and AdamW moments: lower them")
    else:
        cause = (f"the activations (--block_size={config.block_size} x --batch_size={batch_size}) take "
                 f"{need['activations'] / 2**30:.1f} GiB: lower them (--grad_accum keeps the batch)")
    raise UserError(f"this model needs about {sum(need.values()) / 2**30:.1f} GiB to train, more than the "
                    f"{have / 2**30:.1f} GiB free on {device}; {cause}")


# ----------------------------------------------------------------------------
# the whole run

def setup(config, model_config, checkpoint=None):
    """
    Processes, device, data, model, optimizer and loop state for a run,
    restored from the checkpoint when resuming, with the run folder locked
    until train_loop ends. Returns (dist, device, dataset, model, optimizer,
    state).
    """
    device = pick_device(config.device)
    dist = init_distributed(device)
    if config.grad_accum % dist.world_size:
        raise UserError(f"--grad_accum={config.grad_accum} micro-batches per step cannot be split over "
                        f"{dist.world_size} processes: make it a multiple of {dist.world_size}")
    device = use_device(config, dist, device)
    dataset = load_dataset(config.dataset, model_config.block_size)
    if checkpoint is None:
        for key, value in model_keys_from_data(dataset.meta).items():
            setattr(model_config, key, value)
    else:
        check_same_data(checkpoint["data_meta"], dataset.meta, config.dataset)
    model_config.validate()
    check_memory(model_config, config.batch_size, device)
    # one run per folder at a time, locked after every check (a refused run writes nothing); a
    # fresh run looks for an earlier one under the lock, so two starting at once cannot both pass
    lock = lock_run_folder(config.out_dir) if dist.is_main else None
    if checkpoint is None and dist.is_main:
        check_fresh_out_dir(config)
    # the same initial weights in every process
    torch.manual_seed(config.seed)
    model = GPT(model_config).to(device)
    optimizer = make_optimizer(model, config, device)
    state = TrainState(decay_iters=config.max_iters, lock=lock)
    if checkpoint is not None:
        restore(checkpoint, model, optimizer, state)
    if dist.is_main:
        describe(config, model, dataset, state, device, dist, resumed=checkpoint is not None)
    return dist, device, dataset, model, optimizer, state


def describe(config, model, dataset, state, device, dist, resumed):
    """What is about to train, on what, where."""
    if resumed:
        left = "" if state.step < config.max_iters or config.max_seconds else ": nothing left to train"
        print(f"resuming from step {state.step} of {config.max_iters}{left}")
    counts = model.num_params()
    processes = f" x {dist.world_size} processes" if dist.world_size > 1 else ""
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    print(f"model: {counts['total']:,} parameters ({counts['embedding']:,} embedding + head, "
          f"{counts['core']:,} core); data: {config.dataset} ({dataset.meta['tokenization']}, "
          f"{len(dataset.train):,} train tokens); device: {device}{processes}{threads}")


def report(result, config, seconds):
    print(f"done in {seconds:.1f} s: val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits per "
          f"byte; checkpoint {Path(config.out_dir) / CHECKPOINT_NAME}")


def main(argv=None):
    config, model_config, checkpoint = configure(sys.argv[1:] if argv is None else argv)
    dist, device, dataset, model, optimizer, state = setup(config, model_config, checkpoint)
    t0 = time.perf_counter()
    try:
        result = train_loop(model, optimizer, dataset, config, state, device, dist=dist)
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
    if result is not None:
        report(result, config, time.perf_counter() - t0)


if __name__ == "__main__":
    run(main)
