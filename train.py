"""
Train a GPT on the binaries written by data/prepare.py.

    python train.py                                   # cpu-tiny on data/default_bytes, ~2 minutes on 2 cores
    python train.py --preset=stlm-10m --dataset=default_bpe --device=cuda
    python train.py --resume                          # continue out/ckpt.pt exactly where it stopped
    python train.py --help                            # every key, with its default

Any GPTConfig key (--n_layer=6, --pos=rope, ...) overrides the preset
(--help shows the default preset's values).
Validation reports bits per byte, the one metric that compares models across
tokenizations. A pooled byte model (byte_tokenizer.py) trains on bytes data:
python train.py --embedder=pooled --boundary=space --block_size=256.
Each evaluation writes out_dir/ckpt.pt atomically, with all a resume needs;
Ctrl-C and SIGTERM write one too, at the next step boundary, before exiting.
Metrics go to out_dir/metrics.jsonl. checkpointing.py keeps the run's folder
safe: no re-run clobbers a run, no resume goes on with other data or writes
where a checkpoint says, no diverged (NaN) model is saved.

The loop is a set of functions (load_dataset, get_batch, evaluate, train_loop)
that distill.py reuses with its own loss.
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

from checkpointing import (CHECKPOINT_NAME, MetricsLog, StopRequests, TrainState, all_finite, check_fresh_out_dir,
                           check_resume_step, check_same_data, diverged, make_checkpoint, restore, resumed_settings)
from cli import UserError, parse_config, run
from hardware import Distributed, check_memory, init_distributed, pick_device, set_cpu_threads
from model import GPT, GPTConfig, load_checkpoint, preset_config, save_checkpoint
from optim import OPTIMIZERS, TimeBudget, learning_rate, make_optimizer  # noqa: F401 (train.make_optimizer)
from tokenizer import TOKEN_BYTES_NAME

DATA_DIR = Path(__file__).resolve().parent / "data"
DATA_MODEL_KEYS = frozenset({"vocab_size"})  # set by the data: model_keys_from_data


@dataclass
class TrainConfig:
    # data and model
    dataset: str = "default_bytes"  # a folder under data/ (or any path) written by data/prepare.py
    preset: str = "cpu-tiny"  # named shape from model.py; GPTConfig keys override it
    out_dir: str = "out"
    resume: bool = False  # continue from out_dir/ckpt.pt
    overwrite: bool = False  # a fresh run may replace the run already in out_dir
    # optimisation: the fastest recipe measured for cpu-tiny on a CPU (README); nanoGPT's is
    # --optimizer=adamw --batch_size=12 --max_iters=2000 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=100
    batch_size: int = 24  # Muon's Newton-Schulz costs the same per step at any batch: fewer, larger steps amortize it
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 700
    max_seconds: float = 0.0  # a time budget for the loop: the schedule follows it and max_iters is ignored; 0 = off
    budget_clock: str = "wall"  # what max_seconds counts: wall | cpu (this process's CPU time, summed over its threads: fair on a shared machine)
    learning_rate: float = 3e-3  # AdamW's (embeddings, head, norms, biases; everything under --optimizer=adamw)
    min_lr: float = 3e-4  # the cosine schedule ends here
    warmup_iters: int = 50
    lr_decay_iters: int = 0  # where the cosine reaches min_lr; 0 = max_iters (of the first run: a resume keeps it)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99  # small models see few tokens per step: a shorter second-moment memory helps
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: str = "muon"  # muon (Muon for the core's weight matrices, AdamW for the rest) | adamw
    muon_lr: float = 0.03  # Muon's learning rate (times sqrt(rows / cols) for tall matrices); follows the schedule
    muon_momentum: float = 0.95
    # evaluation and logging
    eval_interval: int = 500
    eval_tokens: int = 131072  # validation tokens per evaluation (from the start of val); 0 = all
    log_interval: int = 10
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0 = the cores idle at the start (hardware.py explains why)
    compile: bool = False  # torch.compile: faster steps after a 30-60 s first step
    bf16: bool = False  # bf16 autocast on CPU too (CUDA always uses it)
    seed: int = 1337


# ----------------------------------------------------------------------------
# configuration

def configure(argv, extra_configs=(), usage=__doc__):
    """
    Train and model configs from the command line; on --resume the model's
    comes from the checkpoint. extra_configs (a caller's own dataclasses, as
    distill.py has) are filled from the same arguments.
    """
    # the model keys' defaults shown by --help are the default preset's, what `python train.py` trains
    config, model_args = TrainConfig(), preset_config(TrainConfig.preset)
    assigned = parse_config([config, model_args, *extra_configs], argv, usage=usage)
    model_keys = {f.name for f in dataclasses.fields(GPTConfig)}
    model_overrides = {k: v for k, v in assigned.items() if k in model_keys}
    for key in DATA_MODEL_KEYS & model_overrides.keys():
        raise UserError(f"--{key} is set by the data (its meta.json), not on the command line: drop --{key}")
    checkpoint = None
    if config.resume:
        if model_overrides:
            raise UserError(f"--resume takes the model's shape from the checkpoint; drop --{next(iter(model_overrides))}")
        checkpoint = load_checkpoint(Path(config.out_dir) / CHECKPOINT_NAME)
        # the stored run's settings, except what this command line changes (e.g. a longer --max_iters)
        stored = {**checkpoint, "train_config": {**PRE_MUON_DEFAULTS, **checkpoint["train_config"]}}
        config = TrainConfig(**resumed_settings(stored, {f.name for f in dataclasses.fields(TrainConfig)}, assigned))
        model_config = GPTConfig(**checkpoint["model_config"])
        check_resume_step(config, checkpoint)
        if not config.lr_decay_iters:  # a checkpoint from before the schedule was stored: its own max_iters
            config.lr_decay_iters = checkpoint["train_config"]["max_iters"]
    else:
        check_fresh_out_dir(config)
        model_config = preset_config(config.preset, **model_overrides)
        # the schedule is fixed by the first run: a resume with a longer --max_iters keeps it
        config.lr_decay_iters = config.lr_decay_iters or config.max_iters
    check_train_config(config)
    return config, model_config, checkpoint


def check_train_config(config):
    """Refuse values that would crash later or train silently wrong, naming the key."""
    for key in ("batch_size", "grad_accum", "max_iters", "log_interval", "eval_interval"):
        if getattr(config, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(config, key)}")
    for key in ("warmup_iters", "lr_decay_iters", "eval_tokens", "threads", "seed"):
        if getattr(config, key) < 0:
            raise UserError(f"--{key} must be 0 or more, got {getattr(config, key)}")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise UserError(f"--learning_rate must be a positive number, got {config.learning_rate}")
    for key in ("min_lr", "weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(config, key)) and getattr(config, key) >= 0):
            raise UserError(f"--{key} must be a number >= 0, got {getattr(config, key)}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(config, key) < 1:
            raise UserError(f"--{key} must be in [0, 1), got {getattr(config, key)}")
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer={config.optimizer} is not one of {', '.join(OPTIMIZERS)}")
    if not (math.isfinite(config.muon_lr) and config.muon_lr > 0) or not 0 <= config.muon_momentum < 1:
        raise UserError(f"--muon_lr must be positive and --muon_momentum in [0, 1), got {config.muon_lr} "
                        f"and {config.muon_momentum}")
    if not (math.isfinite(config.max_seconds) and config.max_seconds >= 0):
        raise UserError(f"--max_seconds must be 0 (off) or positive, got {config.max_seconds}")
    if config.budget_clock not in TimeBudget.CLOCKS:
        raise UserError(f"--budget_clock={config.budget_clock} is not one of {', '.join(TimeBudget.CLOCKS)}")


PRE_MUON_DEFAULTS = {"optimizer": "adamw"}  # a checkpoint from before --optimizer was trained with AdamW


# ----------------------------------------------------------------------------
# data

@dataclass
class Dataset:
    meta: dict
    train: np.ndarray  # token ids
    val: np.ndarray
    token_bytes: torch.Tensor  # bytes of text each token id stands for (bits per byte)


def load_dataset(name, block_size):
    """The train/val token arrays of a prepared dataset, checked against the context length."""
    folder = Path(name) if Path(name).is_dir() else DATA_DIR / name
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"no prepared dataset at {folder}: run python data/prepare.py (see its --help)")
    meta = json.loads(meta_path.read_text())
    if meta["tokenization"] == "pooled":
        raise UserError(f"{folder} holds byte chunks for the earlier pooled model; pooled models now read plain "
                        "bytes: run python data/prepare.py (bytes) and train with --embedder=pooled")
    splits = {}
    for split in ("train", "val"):
        splits[split] = np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        if len(splits[split]) < block_size + 1:
            raise UserError(f"{folder.name}'s {split} split has {len(splits[split])} tokens, fewer than the context "
                            f"needs ({block_size} + 1): use a larger corpus or a smaller --block_size")
    if not (folder / TOKEN_BYTES_NAME).is_file():
        raise UserError(f"{folder} has no {TOKEN_BYTES_NAME} (prepared by an older version): "
                        "run python data/prepare.py again")
    token_bytes = torch.from_numpy(np.load(folder / TOKEN_BYTES_NAME, allow_pickle=False).astype(np.int64))
    return Dataset(meta, splits["train"], splits["val"], token_bytes)


def get_batch(data, batch_size, block_size, generator, device):
    """
    Random windows of data: inputs (B, T) and the same windows shifted by one
    token as targets.
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
def evaluate(model, data, token_bytes, block_size, max_tokens=0, batch_size=64, autocast=contextlib.nullcontext()):
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
        windows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)).to(device)
        x, y = windows[:, :-1], windows[:, 1:]
        with autocast:
            _, nats = model(x, y, reduction="sum")
        total_nats += nats.item()
        total_tokens += y.size(0) * y.size(1)
        total_bytes += predicted_bytes(y, token_bytes)
    model.train(was_training)
    return {"val_loss": total_nats / total_tokens, "val_bpb": total_nats / (math.log(2) * total_bytes)}


def language_model_loss(model, x, y):
    """The default loss: next-token cross-entropy. distill.py passes its own with the same signature."""
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

def train_loop(model, optimizer, dataset, config, state, device, loss_fn=language_model_loss, batch_fn=get_batch,
               dist=Distributed()):
    """
    Run optimizer steps from state.step to config.max_iters, evaluating and
    checkpointing every eval_interval steps and at the end; returns the last
    evaluation. distill.py passes its own batch_fn(data, batch_size,
    block_size, generator, device) -> (x, y) and loss_fn(model, x, y) ->
    (loss, extra metrics); y may then carry a teacher's targets.
    """
    raw_model = model
    model, eval_model = wrap_model(model, config, device, dist)
    autocast = contextlib.nullcontext()
    if device.startswith("cuda"):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    elif config.bf16:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    out_dir = Path(config.out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    log = None
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(out_dir, state.step)  # a resumed run drops what was logged after its checkpoint
    saved = {"step": state.step if config.resume else None}  # the last checkpoint known good

    def save():
        if not all_finite(raw_model):  # never replace a good checkpoint with a diverged model
            raise diverged("model", "not finite (NaN or infinity in its weights)", state.step, describe_saved())
        save_checkpoint(make_checkpoint(raw_model, optimizer, config, state, dataset.meta), ckpt_path)
        saved["step"] = state.step

    def describe_saved():
        return None if saved["step"] is None else f"{ckpt_path}, step {saved['step']}"

    def evaluate_and_save():
        result = evaluate(eval_model, dataset.val, dataset.token_bytes, raw_model.config.block_size,
                          config.eval_tokens, autocast=autocast)
        if not math.isfinite(result["val_loss"]):
            raise diverged("validation loss", result["val_loss"], state.step, describe_saved())
        log.write({"step": state.step, "seconds": round(state.seconds, 2), **result})
        tqdm.write(f"step {state.step}: val loss {result['val_loss']:.4f}, val {result['val_bpb']:.4f} bits per byte")
        save()
        return result

    model.train()
    raw_model.set_step(state.step)
    tokens_per_step = config.batch_size * config.grad_accum * raw_model.config.block_size
    timer = Throughput(tokens_per_step, state.step)
    budget = TimeBudget(config.max_seconds, state.seconds, config.budget_clock)
    last_step = config.max_iters if not budget else None  # under a budget, known when the budget is reached
    progress = tqdm(total=last_step, initial=state.step, unit="step", dynamic_ncols=True, disable=not dist.is_main)
    result = None
    try:
        with StopRequests() as stop:
            while last_step is None or state.step < last_step:
                budget_spent = budget.spent_after_next_step(dist) if budget else None
                if budget_spent is not None and budget_spent >= 1.0:
                    last_step = state.step + 1  # the budget ends with this step, taken at min_lr
                lr = learning_rate(state.step, config, budget_spent)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                metrics = accumulate_gradients(model, raw_model.config.block_size, dataset, config, state, device,
                                               dist, loss_fn, batch_fn, autocast)
                if not torch.isfinite(metrics["loss"]):  # checked before optimizer.step: the weights are still good
                    loss = metrics["loss"].item() / config.grad_accum
                    raise diverged("training loss", loss, state.step + 1, describe_saved())
                if config.grad_clip > 0:  # every trained parameter, distill.py's projection included
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   config.grad_clip, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.seconds = budget.tick()
                raw_model.set_step(state.step)
                progress.update(1)

                last = state.step == last_step
                if state.step % config.log_interval == 0 or last:
                    record = {"step": state.step, **mean_metrics(metrics, config, dist), "lr": lr,
                              "tokens_per_s": round(timer.rate(state.step))}
                    if dist.is_main:
                        log.write(record)
                        progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,}")
                if (state.step % config.eval_interval == 0 or last) and dist.is_main:
                    result = evaluate_and_save()
                    state.seconds = budget.tick(was_step=False)  # evaluation counts against the budget
                    timer.restart(state.step)  # evaluation time is not training throughput
                if not last and stop.requested(dist, device):  # a signal: save here, between two steps
                    progress.close()  # before the message, so the bar does not overwrite it
                    if dist.is_main:
                        if saved["step"] != state.step:
                            save()
                        print(f"stopped by {signal.Signals(stop.signum).name} at step {state.step}: "
                              f"saved {ckpt_path}; continue with --resume")
                    sys.exit(stop.exit_status)
    except KeyboardInterrupt:  # a second Ctrl-C: the user wants out now, maybe mid-step, so nothing is saved
        progress.close()
        print(f"interrupted twice: stopped without saving; the last checkpoint: {describe_saved() or 'none written'}")
        sys.exit(130)
    finally:
        progress.close()
    return result


def wrap_model(model, config, device, dist):
    """(model to train, model to evaluate): compiled if asked, and under DDP with several processes."""
    if config.compile:
        model = torch.compile(model)
    eval_model = model  # evaluation runs on the main process only, outside DDP's collective calls
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    return model, eval_model


def accumulate_gradients(model, block_size, dataset, config, state, device, dist, loss_fn, batch_fn, autocast):
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
        x, y = batch_fn(dataset.train, config.batch_size, block_size, torch.Generator().manual_seed(seed), device)
        torch.manual_seed(seed)  # dropout
        sync = dist.world_size == 1 or i == local_accum - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast:
                loss, extra = loss_fn(model, x, y)
            (loss / local_accum).backward()
        for key, value in {"loss": loss, **extra}.items():
            totals[key] = totals.get(key, 0.0) + torch.as_tensor(value).detach().float()
    return totals


def mean_metrics(totals, config, dist):
    """The step's mean of each summed metric, over all micro-batches of all processes."""
    means = torch.stack(list(totals.values())) / config.grad_accum
    if dist.world_size > 1:
        torch.distributed.all_reduce(means)  # sums the processes' shares
    return dict(zip(totals, means.tolist()))


class Throughput:
    """Training tokens per second between two log lines, with evaluation and checkpointing left out."""

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


def model_keys_from_data(meta):
    """The model settings the data decides: the vocabulary (a pooled model checks that it is bytes)."""
    return {"vocab_size": meta["vocab_size"]}


def setup(config, model_config, checkpoint=None):
    """
    Processes, device, data, model, optimizer and loop state for a run,
    restored from the checkpoint when resuming. Returns (dist, device,
    dataset, model, optimizer, state).
    """
    device = pick_device(config.device)
    dist = init_distributed(device)
    if config.grad_accum % dist.world_size:
        raise UserError(f"--grad_accum={config.grad_accum} micro-batches per step cannot be split over "
                        f"{dist.world_size} processes: make it a multiple of {dist.world_size}")
    if device == "cpu":
        set_cpu_threads(config.threads, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    else:
        if dist.world_size > 1:
            device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dataset = load_dataset(config.dataset, model_config.block_size)
    if checkpoint is None:
        for key, value in model_keys_from_data(dataset.meta).items():
            setattr(model_config, key, value)
    else:
        check_same_data(checkpoint["data_meta"], dataset.meta, config.dataset)
    check_memory(model_config, config.batch_size, device)
    torch.manual_seed(config.seed)  # the same initial weights in every process
    model = GPT(model_config).to(device)
    optimizer = make_optimizer(model, config, device)
    state = TrainState()
    if checkpoint is not None:
        restore(checkpoint, model, optimizer, state)
    if dist.is_main:
        if checkpoint is not None:
            print(f"resuming from step {state.step} of {config.max_iters}")
        counts = model.num_params()
        print(f"model: {counts['total']:,} parameters ({counts['embedding']:,} embedding + head, {counts['core']:,} core); "
              f"data: {config.dataset} ({dataset.meta['tokenization']}, {len(dataset.train):,} train tokens); "
              f"device: {device}" + (f" x {dist.world_size} processes" if dist.world_size > 1 else "")
              + (f", {torch.get_num_threads()} threads" if device == "cpu" else ""))
    return dist, device, dataset, model, optimizer, state


def report(result, config, seconds):
    print(f"done in {seconds:.1f} s: val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits per byte; "
          f"checkpoint {Path(config.out_dir) / CHECKPOINT_NAME}")


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
