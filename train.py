"""
Train a GPT on the binaries written by data/prepare.py.

    python train.py                                   # cpu-tiny on data/default_bytes, ~2 minutes on 2 cores
    python train.py --preset=stlm-10m --dataset=default_bpe --device=cuda
    python train.py --resume                          # continue out/ckpt.pt exactly where it stopped
    python train.py --help                            # every key, with its default

Any GPTConfig key (--n_layer=6, --pos=rope, ...) overrides the preset.
Validation reports bits per byte, the one metric that compares models across
tokenizations. Pooled data (byte chunks, data/prepare.py --tokenization=pooled)
trains a pooled model with the same commands: the data picks the embedder.
Each evaluation writes out_dir/ckpt.pt atomically, with all a resume needs;
Ctrl-C writes one too before exiting. Metrics are appended to
out_dir/metrics.jsonl.

The loop is a set of functions (load_dataset, get_batch, evaluate, train_loop)
that distill.py reuses with its own loss.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import UserError, parse_config, run
from muon import Muon, Optimizers
from model import GPT, CausalSelfAttention, GPTConfig, load_checkpoint, preset_config, save_checkpoint
from tokenizer import OFFSETS_DTYPE, ChunkedBytes

DATA_DIR = Path(__file__).resolve().parent / "data"
CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
TOKEN_BYTES_NAME = "token_bytes.npy"  # written by data/prepare.py: bytes of text per token id


@dataclass
class TrainConfig:
    # data and model
    dataset: str = "default_bytes"  # a folder under data/ (or any path) written by data/prepare.py
    preset: str = "cpu-tiny"  # named shape from model.py; GPTConfig keys override it
    out_dir: str = "out"
    resume: bool = False  # continue from out_dir/ckpt.pt
    # optimisation: the fastest recipe measured for cpu-tiny on a CPU (README); nanoGPT's is
    # --optimizer=adamw --batch_size=12 --max_iters=2000 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=100
    batch_size: int = 24  # Muon's Newton-Schulz costs the same per step at any batch: fewer, larger steps amortize it
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 700
    max_seconds: float = 0.0  # a wall-clock budget for the loop: the schedule follows it and max_iters is ignored; 0 = off
    learning_rate: float = 3e-3  # AdamW's (embeddings, head, norms, biases; everything under --optimizer=adamw)
    min_lr: float = 3e-4  # the cosine schedule ends here
    warmup_iters: int = 50
    lr_decay_iters: int = 0  # where the cosine reaches min_lr; 0 = max_iters
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
    threads: int = 0  # CPU threads for torch; 0 = every core
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
    config, model_args = TrainConfig(), GPTConfig()
    assigned = parse_config([config, model_args, *extra_configs], argv, usage=usage)
    model_keys = {f.name for f in dataclasses.fields(GPTConfig)}
    model_overrides = {k: v for k, v in assigned.items() if k in model_keys}
    checkpoint = None
    if config.resume:
        if model_overrides:
            raise UserError(f"--resume takes the model's shape from the checkpoint; drop --{next(iter(model_overrides))}")
        checkpoint = load_checkpoint(Path(config.out_dir) / CHECKPOINT_NAME)
        # the stored run's settings, except what this command line changes (e.g. a longer --max_iters)
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        stored = {**PRE_MUON_DEFAULTS, **checkpoint["train_config"]}  # a checkpoint from before --optimizer used AdamW
        config = TrainConfig(**{**stored, **{k: v for k, v in assigned.items() if k in train_keys}})
        model_config = GPTConfig(**checkpoint["model_config"])
    else:
        model_config = preset_config(config.preset, **model_overrides)
    for key in ("batch_size", "grad_accum", "max_iters", "log_interval", "eval_interval"):
        if getattr(config, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(config, key)}")
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer={config.optimizer} is not one of {', '.join(OPTIMIZERS)}")
    if config.max_seconds < 0:
        raise UserError(f"--max_seconds must be 0 (off) or positive, got {config.max_seconds}")
    return config, model_config, checkpoint


PRE_MUON_DEFAULTS = {"optimizer": "adamw"}


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but torch sees no CUDA GPU: use --device=cpu")
    return name


# ----------------------------------------------------------------------------
# data

@dataclass
class Dataset:
    meta: dict
    train: np.ndarray  # token ids, or ChunkedBytes for pooled data: indexed alike
    val: np.ndarray
    token_bytes: torch.Tensor  # bytes of text each token id stands for (bits per byte); None for pooled data


def load_dataset(name, block_size):
    """The train/val token arrays of a prepared dataset, checked against the context length."""
    folder = Path(name) if Path(name).is_dir() else DATA_DIR / name
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"no prepared dataset at {folder}: run python data/prepare.py (see its --help)")
    meta = json.loads(meta_path.read_text())
    splits = {}
    pooled = meta["tokenization"] == "pooled"
    for split in ("train", "val"):
        splits[split] = np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        if pooled:  # the raw bytes plus where each chunk starts
            offsets = np.memmap(folder / f"{split}.chunks.bin", dtype=np.dtype(OFFSETS_DTYPE), mode="r")
            splits[split] = ChunkedBytes(splits[split], offsets, meta["max_chunk_bytes"])
        if len(splits[split]) < block_size + 1:
            raise UserError(f"{folder.name}'s {split} split has {len(splits[split])} tokens, fewer than the context "
                            f"needs ({block_size} + 1): use a larger corpus or a smaller --block_size")
    token_bytes = None
    if not pooled:
        if not (folder / TOKEN_BYTES_NAME).is_file():
            raise UserError(f"{folder} has no {TOKEN_BYTES_NAME} (prepared by an older version): "
                            "run python data/prepare.py again")
        token_bytes = torch.from_numpy(np.load(folder / TOKEN_BYTES_NAME, allow_pickle=False).astype(np.int64))
    return Dataset(meta, splits["train"], splits["val"], token_bytes)


def get_batch(data, batch_size, block_size, generator, device):
    """
    Random windows of data: inputs (B, T) and the same windows shifted by one
    token as targets; for pooled data (B, T, L) chunks, shifted by one chunk.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    windows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------
# evaluation: bits per byte, the one quality metric

def predicted_bytes(y, token_bytes):
    """Bytes of text the targets stand for: each token id's bytes, or for pooled chunks their real bytes (PAD < 0)."""
    if token_bytes is None:
        return (y >= 0).sum().item()
    return token_bytes[y.cpu()].sum().item()


@torch.no_grad()
def evaluate(model, data, token_bytes, block_size, max_tokens=0, batch_size=64, autocast=contextlib.nullcontext()):
    """
    Validation loss per token and bits per byte, the number that compares models
    across tokenizations:

        bits per byte = (sum of -ln p over every predicted unit) / (ln 2 * UTF-8 bytes those units cover)

    A unit is a byte, a BPE token, or a pooled chunk (its bytes and end symbol);
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
        total_tokens += y.size(0) * y.size(1)  # tokens, or chunks
        total_bytes += predicted_bytes(y, token_bytes)
    model.train(was_training)
    return {"val_loss": total_nats / total_tokens, "val_bpb": total_nats / (math.log(2) * total_bytes)}


# ----------------------------------------------------------------------------
# optimisation

def learning_rate(step, config, budget_spent=None):
    """
    Linear warmup, then cosine decay from learning_rate to min_lr at
    lr_decay_iters; under a time budget (max_seconds) the cosine runs over
    budget_spent instead, the share of the budget used once this step is
    done, and reaches min_lr at 1.
    """
    warmup = config.learning_rate * (step + 1) / max(1, config.warmup_iters)
    if budget_spent is not None:
        # the smaller of the two: a budget that ends during the warmup still ends at min_lr
        return min(warmup, cosine_decay(budget_spent, config))
    if step < config.warmup_iters:
        return warmup
    decay_iters = config.lr_decay_iters or config.max_iters
    return cosine_decay((step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters), config)


def cosine_decay(progress, config):
    """learning_rate at progress 0, min_lr at 1 and beyond."""
    progress = min(1.0, progress)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


OPTIMIZERS = ("adamw", "muon")
def muon_matrices(model):
    """
    The parameters Muon updates: the 2-D weight matrices of every GPT core in
    model. Embeddings and the head (rows are tokens, not a linear map to
    orthogonalize), norm gains and biases stay with AdamW, as in modded-nanogpt.
    """
    chosen = []
    for gpt in (m for m in model.modules() if isinstance(m, GPT)):
        outer = {id(p) for m in (gpt.wte, gpt.lm_head, gpt.wpe) if m is not None for p in m.parameters()}
        chosen += [p for p in gpt.parameters() if p.dim() == 2 and id(p) not in outer and p.requires_grad]
    return chosen


def make_optimizer(model, config, device):
    """
    AdamW, or Muon for the core's matrices and AdamW for the rest. Each group
    carries lr_scale: its learning rate is the schedule's times that.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    muon_ids = {id(p) for p in muon_matrices(model)} if config.optimizer == "muon" else set()
    rest = [p for p in params if id(p) not in muon_ids]
    # decay matrices only: biases and norm gains are scales, not features to shrink
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    # fused: one kernel for all parameters instead of about a dozen ops per tensor (5x faster at cpu-tiny on CPU)
    adamw = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=True)
    if not muon_ids:
        return adamw
    # Muon (Jordan et al. 2024, modded-nanogpt's optimizer): momentum, then each weight matrix's
    # update is orthogonalized, so every direction of the matrix learns at the same rate
    qkv_blocks = {id(m.c_attn.weight): [m.n_head * m.head_dim, m.n_kv_head * m.head_dim, m.n_kv_head * m.head_dim]
                  for m in model.modules() if isinstance(m, CausalSelfAttention)}
    groups = []
    for p in (p for p in params if id(p) in muon_ids):
        group = {"params": [p], "lr_scale": config.muon_lr / config.learning_rate}
        if id(p) in qkv_blocks:
            group["row_blocks"] = qkv_blocks[id(p)]
        groups.append(group)
    ns_dtype = torch.bfloat16 if device.startswith("cuda") or config.bf16 else torch.float32
    muon = Muon(groups, ns_dtype=ns_dtype, lr=config.muon_lr, weight_decay=config.weight_decay,
                momentum=config.muon_momentum)
    return Optimizers(adamw, muon)


def language_model_loss(model, x, y):
    """The default loss: next-token cross-entropy. distill.py passes its own with the same signature."""
    _, loss = model(x, y)
    return loss, {}


# ----------------------------------------------------------------------------
# processes: one, or one per device under torchrun

@dataclass
class Distributed:
    rank: int = 0  # this process among all of them
    local_rank: int = 0  # this process on its machine: picks the GPU
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0  # the only process that logs, evaluates and writes checkpoints


def init_distributed(device):
    """Join the process group when torchrun started us (it sets RANK and friends); else a single process."""
    if "RANK" not in os.environ:
        return Distributed()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return Distributed(torch.distributed.get_rank(), int(os.environ["LOCAL_RANK"]), torch.distributed.get_world_size())


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
# checkpoints: everything a resume needs to continue bit for bit

@dataclass
class TrainState:
    step: int = 0  # optimizer steps done; with the seed it fixes the data and RNG position
    seconds: float = 0.0  # wall-clock seconds spent in the loop so far (what --max_seconds budgets)


def make_checkpoint(model, optimizer, config, state, meta):
    return {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.config),
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(config),
        "step": state.step,
        "seconds": state.seconds,
        "data_meta": meta,
    }


def restore(checkpoint, model, optimizer, state):
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    state.step = checkpoint["step"]
    state.seconds = checkpoint.get("seconds", 0.0)


def log_metrics(out_dir, record):
    with open(Path(out_dir) / METRICS_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------
# a wall-clock budget

class TimeBudget:
    """
    Seconds spent in the loop, and the share of max_seconds the next step
    will have used once done, predicted from the last step's duration: the
    schedule reaches its end (min_lr) on the step that reaches the budget,
    and the loop stops there, within one step of it.
    """

    def __init__(self, max_seconds, seconds_before=0.0):
        self.max_seconds = max_seconds
        self.seconds = seconds_before  # spent by earlier runs this one resumes
        self.last_tick = time.perf_counter()
        self.last_step_seconds = 0.0

    def __bool__(self):
        return self.max_seconds > 0

    def tick(self, was_step=True):
        """Count the time since the last tick (a training step, or not); returns the seconds spent in all."""
        now = time.perf_counter()
        if was_step:
            self.last_step_seconds = now - self.last_tick
        self.seconds += now - self.last_tick
        self.last_tick = now
        return self.seconds

    def spent_after_next_step(self, dist):
        spent = torch.tensor((self.seconds + self.last_step_seconds) / self.max_seconds)
        if dist.world_size > 1:
            torch.distributed.broadcast(spent, 0)  # every process stops on the same step
        return spent.item()


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
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    def evaluate_and_save():
        result = evaluate(eval_model, dataset.val, dataset.token_bytes, raw_model.config.block_size,
                          config.eval_tokens, autocast=autocast)
        log_metrics(out_dir, {"step": state.step, "seconds": round(state.seconds, 2), **result})
        tqdm.write(f"step {state.step}: val loss {result['val_loss']:.4f}, val {result['val_bpb']:.4f} bits per byte")
        save_checkpoint(make_checkpoint(raw_model, optimizer, config, state, dataset.meta), out_dir / CHECKPOINT_NAME)
        return result

    model.train()
    raw_model.set_step(state.step)
    tokens_per_step = config.batch_size * config.grad_accum * raw_model.config.block_size
    timer = Throughput(tokens_per_step, state.step)
    budget = TimeBudget(config.max_seconds, state.seconds)
    last_step = config.max_iters if not budget else None  # under a budget, known when the budget is reached
    progress = tqdm(total=last_step, initial=state.step, unit="step", dynamic_ncols=True, disable=not dist.is_main)
    result = None
    try:
        while last_step is None or state.step < last_step:
            budget_spent = budget.spent_after_next_step(dist) if budget else None
            if budget_spent is not None and budget_spent >= 1.0:
                last_step = state.step + 1  # the budget ends with this step, taken at min_lr
            lr = learning_rate(state.step, config, budget_spent)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            metrics = accumulate_gradients(model, raw_model.config.block_size, dataset, config, state, device, dist,
                                           loss_fn, batch_fn, autocast)
            if config.grad_clip > 0:  # every trained parameter, distill.py's projection included
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip,
                                               foreach=True)
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
                    log_metrics(out_dir, record)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,}")
            if (state.step % config.eval_interval == 0 or last) and dist.is_main:
                result = evaluate_and_save()
                state.seconds = budget.tick(was_step=False)  # evaluation counts against the budget
                timer.restart(state.step)  # evaluation time is not training throughput
    except KeyboardInterrupt:
        progress.close()
        if dist.is_main:
            save_checkpoint(make_checkpoint(raw_model, optimizer, config, state, dataset.meta), out_dir / CHECKPOINT_NAME)
            print(f"interrupted at step {state.step}: saved {out_dir / CHECKPOINT_NAME}; continue with --resume")
        sys.exit(130)
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
    """The model settings the data decides: the vocabulary, and for pooled data the embedder and chunk size."""
    keys = {"vocab_size": meta["vocab_size"], "embedder": "tokens"}
    if meta["tokenization"] == "pooled":
        keys.update(embedder="pooled", max_chunk_bytes=meta["max_chunk_bytes"])
    return keys


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
        # processes on one machine share its cores
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(config.threads or max(1, os.cpu_count() // local_processes))
    else:
        if dist.world_size > 1:
            device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dataset = load_dataset(config.dataset, model_config.block_size)
    for key, value in model_keys_from_data(dataset.meta).items():
        if checkpoint is None:
            setattr(model_config, key, value)
        elif getattr(model_config, key) != value:
            raise UserError(f"the checkpoint's {key} ({getattr(model_config, key)}) does not match "
                            f"{config.dataset}'s ({value}): resume on the data it was trained on")
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
              f"device: {device}" + (f" x {dist.world_size} processes" if dist.world_size > 1 else ""))
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
