"""
Train a GPT on the binaries written by data/prepare.py.

    python train.py                                   # cpu-tiny on data/default_bytes, ~2 minutes on 2 cores
    python train.py --preset=stlm-10m --dataset=default_bpe --device=cuda
    python train.py --resume                          # continue out/ckpt.pt exactly where it stopped
    python train.py --help                            # every key, with its default

Any GPTConfig key (--n_layer=6, --pos=rope, ...) overrides the preset.
Validation reports bits per byte, the one metric that compares models across
tokenizations. Each evaluation writes out_dir/ckpt.pt atomically, with all a
resume needs; Ctrl-C writes one too before exiting. Metrics are appended to
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

def configure(argv):
    """Train and model configs from the command line; on --resume the model's comes from the checkpoint."""
    config, model_args = TrainConfig(), GPTConfig()
    assigned = parse_config([config, model_args], argv, usage=__doc__)
    model_keys = {f.name for f in dataclasses.fields(GPTConfig)}
    model_overrides = {k: v for k, v in assigned.items() if k in model_keys}
    checkpoint = None
    if config.resume:
        if model_overrides:
            raise UserError(f"--resume takes the model's shape from the checkpoint; drop --{next(iter(model_overrides))}")
        checkpoint = load_checkpoint(Path(config.out_dir) / CHECKPOINT_NAME)
        # the stored run's settings, except what this command line changes (e.g. a longer --max_iters)
        config = TrainConfig(**{**checkpoint["train_config"], **assigned})
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
    train: np.ndarray
    val: np.ndarray
    token_bytes: torch.Tensor  # bytes of text each token id stands for (bits per byte)


def load_dataset(name, block_size):
    """The train/val token arrays of a prepared dataset, checked against the context length."""
    folder = Path(name) if Path(name).is_dir() else DATA_DIR / name
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"no prepared dataset at {folder}: run python data/prepare.py (see its --help)")
    meta = json.loads(meta_path.read_text())
    splits = {}
    for split in ("train", "val"):
        splits[split] = np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        if len(splits[split]) < block_size + 1:
            raise UserError(f"{folder.name}'s {split} split has {len(splits[split])} tokens, fewer than the context "
                            f"needs ({block_size} + 1): use a larger corpus or a smaller --block_size")
    token_bytes = torch.tensor([len(b) for b in token_byte_table(meta["tokenization"])])
    return Dataset(meta, splits["train"], splits["val"], token_bytes)


def get_batch(data, batch_size, block_size, generator, device):
    """Random windows of data: inputs (B, T) and the same windows shifted by one token as targets."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    windows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------
# evaluation

def bits_per_byte(total_nats, total_bytes):
    """Total negative log-likelihood in nats, converted to bits and spread over the text's bytes."""
    return total_nats / (math.log(2) * total_bytes)


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
            logits, _ = model(x)
        total_nats += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        total_tokens += y.numel()
        total_bytes += token_bytes[y.cpu()].sum().item()
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
# state: everything a resume needs to continue bit for bit

@dataclass
class TrainState:
    step: int
    batch_generator: torch.Generator  # the data position: which windows come next


def make_checkpoint(model, optimizer, config, state, meta):
    return {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.config),
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(config),
        "step": state.step,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "batches": state.batch_generator.get_state(),
        },
        "data_meta": meta,
    }


def restore(checkpoint, model, optimizer, state):
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    state.step = checkpoint["step"]
    state.batch_generator.set_state(checkpoint["rng"]["batches"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])


def log_metrics(out_dir, record):
    with open(Path(out_dir) / METRICS_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------
# the loop

def train_loop(model, optimizer, dataset, config, state, device, loss_fn=language_model_loss):
    """
    Run optimizer steps from state.step to config.max_iters, evaluating and
    checkpointing every eval_interval steps and at the end. loss_fn(model, x, y)
    returns (loss, extra metrics); extra metrics are logged with the loss.
    """
    raw_model = model
    if config.compile:
        model = torch.compile(model)
    autocast = contextlib.nullcontext()
    if device.startswith("cuda"):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    block_size = raw_model.config.block_size
    tokens_per_step = config.batch_size * config.grad_accum * block_size
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        save_checkpoint(make_checkpoint(raw_model, optimizer, config, state, dataset.meta), out_dir / CHECKPOINT_NAME)

    def run_eval():
        result = evaluate(model, dataset.val, dataset.token_bytes, block_size, config.eval_tokens, autocast=autocast)
        log_metrics(out_dir, {"step": state.step, **result})
        tqdm.write(f"step {state.step}: val loss {result['val_loss']:.4f}, val {result['val_bpb']:.4f} bits per byte")
        return result

    model.train()
    result = None
    progress = tqdm(total=config.max_iters, initial=state.step, unit="step", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), state.step
    try:
        while state.step < config.max_iters:
            lr = learning_rate(state.step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(config.grad_accum):
                x, y = get_batch(dataset.train, config.batch_size, block_size, state.batch_generator, device)
                with autocast:
                    loss, extra = loss_fn(model, x, y)
                (loss / config.grad_accum).backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            progress.update(1)

            if state.step % config.log_interval == 0 or state.step == config.max_iters:
                now = time.perf_counter()
                tokens_per_s = tokens_per_step * (state.step - step_last) / (now - t_last)
                t_last, step_last = now, state.step
                record = {"step": state.step, "loss": loss.item(), "lr": lr, "tokens_per_s": round(tokens_per_s)}
                record.update({k: float(v) for k, v in extra.items()})
                log_metrics(out_dir, record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            if state.step % config.eval_interval == 0 or state.step == config.max_iters:
                result = run_eval()
                save()
                t_last, step_last = time.perf_counter(), state.step  # evaluation time is not training throughput
    except KeyboardInterrupt:
        progress.close()
        save()
        print(f"interrupted at step {state.step}: saved {out_dir / CHECKPOINT_NAME}; continue with --resume")
        sys.exit(130)
    progress.close()
    return result


def main(argv=None):
    config, model_config, checkpoint = configure(sys.argv[1:] if argv is None else argv)
    device = pick_device(config.device)
    if device == "cpu":
        torch.set_num_threads(config.threads or os.cpu_count())
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dataset = load_dataset(config.dataset, model_config.block_size)
    if checkpoint is None:
        model_config.vocab_size = dataset.meta["vocab_size"]  # the data decides the vocabulary
    elif model_config.vocab_size != dataset.meta["vocab_size"]:
        raise UserError(f"the checkpoint's vocabulary ({model_config.vocab_size}) does not match "
                        f"{config.dataset}'s ({dataset.meta['vocab_size']}): resume on the data it was trained on")
    torch.manual_seed(config.seed)
    model = GPT(model_config).to(device)
    optimizer = make_optimizer(model, config, device)
    state = TrainState(step=0, batch_generator=torch.Generator().manual_seed(config.seed))
    if checkpoint is not None:
        restore(checkpoint, model, optimizer, state)
        print(f"resuming from step {state.step} of {config.max_iters}")
    counts = model.num_params()
    print(f"model: {counts['total']:,} parameters ({counts['embedding']:,} embedding + head, {counts['core']:,} core); "
          f"data: {config.dataset} ({dataset.meta['tokenization']}, {len(dataset.train):,} train tokens); device: {device}")
    t0 = time.perf_counter()
    result = train_loop(model, optimizer, dataset, config, state, device)
    if result is not None:
        print(f"done in {time.perf_counter() - t0:.1f} s: val loss {result['val_loss']:.4f}, "
              f"{result['val_bpb']:.4f} bits per byte; checkpoint {Path(config.out_dir) / CHECKPOINT_NAME}")


if __name__ == "__main__":
    run(main)
