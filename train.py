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

from byte_tokenizer import OFFSETS_DTYPE, ChunkedBytes
from cli import UserError, parse_config, run
from model import GPT, GPTConfig, load_checkpoint, model_from_checkpoint, preset_config, save_checkpoint, token_byte_table

DATA_DIR = Path(__file__).resolve().parent / "data"
CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    # data and model
    dataset: str = "default_bytes"  # a folder under data/ (or any path) written by data/prepare.py
    preset: str = "cpu-tiny"  # named shape from model.py; GPTConfig keys override it
    out_dir: str = "out"
    resume: bool = False  # continue from out_dir/ckpt.pt
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000
    learning_rate: float = 2e-3
    min_lr: float = 2e-4  # the cosine schedule ends here
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # where the cosine reaches min_lr; 0 = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99  # small models see few tokens per step: a shorter second-moment memory helps
    grad_clip: float = 1.0  # 0 disables clipping
    # evaluation and logging
    eval_interval: int = 500
    eval_tokens: int = 131072  # validation tokens per evaluation (from the start of val); 0 = all
    log_interval: int = 10
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0 = every core
    compile: bool = False  # torch.compile: faster steps after a 30-60 s first step
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
        config = TrainConfig(**{**checkpoint["train_config"], **{k: v for k, v in assigned.items() if k in train_keys}})
        model_config = GPTConfig(**checkpoint["model_config"])
    else:
        model_config = preset_config(config.preset, **model_overrides)
    for key in ("batch_size", "grad_accum", "max_iters", "log_interval", "eval_interval"):
        if getattr(config, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(config, key)}")
    return config, model_config, checkpoint


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
    token_bytes = None if pooled else torch.tensor([len(b) for b in token_byte_table(meta["tokenization"])])
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
# evaluation

def bits_per_byte(total_nats, total_bytes):
    """Total negative log-likelihood in nats, converted to bits and spread over the text's bytes."""
    return total_nats / (math.log(2) * total_bytes)


def predicted_bytes(y, token_bytes):
    """Bytes of text the targets stand for: each token's bytes, or a pooled chunk's bytes (padding is < 0)."""
    if token_bytes is None:
        return (y >= 0).sum().item()
    return token_bytes[y.cpu()].sum().item()


@torch.no_grad()
def evaluate(model, data, token_bytes, block_size, max_tokens=0, batch_size=64, autocast=contextlib.nullcontext()):
    """
    Mean loss per token and bits per byte over consecutive, non-overlapping
    windows from the start of data: the same tokens every time, so numbers
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
    return {"val_loss": total_nats / total_tokens, "val_bpb": bits_per_byte(total_nats, total_bytes)}


# ----------------------------------------------------------------------------
# optimisation

def learning_rate(step, config):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    decay_iters = config.lr_decay_iters or config.max_iters
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / config.warmup_iters
    if step >= decay_iters:
        return config.min_lr
    progress = (step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def make_optimizer(model, config, device):
    # decay matrices only: biases and norm gains are scales, not features to shrink
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             fused=device.startswith("cuda"))


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


def make_checkpoint(model, optimizer, config, state, meta):
    return {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.config),
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(config),
        "step": state.step,
        "data_meta": meta,
    }


def restore(checkpoint, model, optimizer, state):
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    state.step = checkpoint["step"]


def log_metrics(out_dir, record):
    with open(Path(out_dir) / METRICS_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------
# the loop

def train_loop(model, optimizer, dataset, config, state, device, loss_fn=language_model_loss, batch_fn=get_batch,
               dist=Distributed()):
    """
    Run optimizer steps from state.step to config.max_iters, evaluating and
    checkpointing every eval_interval steps and at the end.
    batch_fn(data, batch_size, block_size, generator, device) returns (x, y);
    loss_fn(model, x, y) returns (loss, extra metrics), both averaged over the
    step's micro-batches and logged. distill.py passes its own: y may then
    carry the teacher's targets.
    With several processes each runs grad_accum / world_size of the step's
    micro-batches; gradients are averaged once per step.
    """
    raw_model = model
    if config.compile:
        model = torch.compile(model)
    eval_model = model  # evaluation runs on the main process only, outside DDP's collective calls
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    autocast = contextlib.nullcontext()
    if device.startswith("cuda"):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    block_size = raw_model.config.block_size
    local_accum = config.grad_accum // dist.world_size
    first_micro_batch = dist.rank * local_accum  # this process's share of the step's micro-batches
    tokens_per_step = config.batch_size * config.grad_accum * block_size
    out_dir = Path(config.out_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        save_checkpoint(make_checkpoint(raw_model, optimizer, config, state, dataset.meta), out_dir / CHECKPOINT_NAME)

    def run_eval():
        result = evaluate(eval_model, dataset.val, dataset.token_bytes, block_size, config.eval_tokens, autocast=autocast)
        log_metrics(out_dir, {"step": state.step, **result})
        tqdm.write(f"step {state.step}: val loss {result['val_loss']:.4f}, val {result['val_bpb']:.4f} bits per byte")
        return result

    model.train()
    raw_model.set_step(state.step)
    result = None
    progress = tqdm(total=config.max_iters, initial=state.step, unit="step", dynamic_ncols=True, disable=not dist.is_main)
    t_last, step_last = time.perf_counter(), state.step
    try:
        while state.step < config.max_iters:
            lr = learning_rate(state.step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            totals = {}  # loss and extra metrics summed over this process's micro-batches
            for i in range(local_accum):
                seed = micro_batch_seed(config.seed, state.step, first_micro_batch + i)
                x, y = batch_fn(dataset.train, config.batch_size, block_size, torch.Generator().manual_seed(seed), device)
                torch.manual_seed(seed)  # dropout
                # only the last micro-batch's backward averages gradients across processes
                sync = dist.world_size == 1 or i == local_accum - 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast:
                        loss, extra = loss_fn(model, x, y)
                    (loss / local_accum).backward()
                for key, value in {"loss": loss, **extra}.items():
                    totals[key] = totals.get(key, 0.0) + torch.as_tensor(value).detach().float()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            raw_model.set_step(state.step)
            progress.update(1)

            if state.step % config.log_interval == 0 or state.step == config.max_iters:
                means = torch.stack(list(totals.values())) / config.grad_accum
                if dist.world_size > 1:
                    torch.distributed.all_reduce(means)  # sums the processes' shares into the step's mean
                now = time.perf_counter()
                tokens_per_s = tokens_per_step * (state.step - step_last) / (now - t_last)
                t_last, step_last = now, state.step
                record = {"step": state.step, **dict(zip(totals, means.tolist())), "lr": lr,
                          "tokens_per_s": round(tokens_per_s)}
                if dist.is_main:
                    log_metrics(out_dir, record)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            if (state.step % config.eval_interval == 0 or state.step == config.max_iters) and dist.is_main:
                result = run_eval()
                save()
                t_last, step_last = time.perf_counter(), state.step  # evaluation time is not training throughput
    except KeyboardInterrupt:
        progress.close()
        if dist.is_main:
            save()
            print(f"interrupted at step {state.step}: saved {out_dir / CHECKPOINT_NAME}; continue with --resume")
        sys.exit(130)
    progress.close()
    return result


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
