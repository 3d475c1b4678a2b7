"""
A training run's folder, kept safe: its checkpoint, its metrics log, and the
rules that stop a run from clobbering or silently corrupting either.

train.py calls these; they are here, not there, because each guards against
one way of losing work or getting a wrong result without noticing:

- a fresh run into a folder that already holds a run is refused (--overwrite
  replaces it), so nobody loses a checkpoint to a re-run command;
- --resume takes everything but the machine's settings from the checkpoint,
  and never lets the checkpoint's stored paths decide where files are written:
  out_dir is always the command line's;
- --resume refuses data that differs from what the model was trained on in
  anything but file paths (tokenization, vocabulary, segmenter, chunk sizes,
  corpus and its size), and a --max_iters below the saved step;
- the metrics log holds each step once: a resumed run drops the records logged
  after its checkpoint before appending its own;
- Ctrl-C and SIGTERM only set a flag: the loop saves at the next step boundary,
  never in the middle of optimizer.step(); a second Ctrl-C quits unsaved;
- a model with a NaN or infinity in it is never saved;
- checkpoints are written to a temp file and renamed: a kill mid-write keeps
  the previous one, and so does a full disk, which leaves no temp file behind;
- checkpoints load with weights_only=True: a file carrying pickled code is
  refused, and said to be.
"""

import dataclasses
import errno
import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError

CHECKPOINT_FORMAT = "stlm-checkpoint"
CHECKPOINT_VERSION = 1
# torch's messages when its zip writer cannot write, as on a full disk: they carry no errno
TORCH_WRITE_FAILURES = ("inline_container", "file write failed", "iostream error", "No space left")
CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
# TrainConfig keys a resume takes from its own command line, never from the checkpoint: where files are
# written (a copied run, or a crafted file, must not write where it came from) and what this machine has
LOCAL_KEYS = ("out_dir", "resume", "overwrite", "device", "threads")
# meta.json keys that say where the data came from, not what it is: a copy of the corpus elsewhere resumes
DATA_PATH_KEYS = ("sources",)


# ----------------------------------------------------------------------------
# checkpoint files: written atomically, loaded without running code

def save_checkpoint(checkpoint, path):
    """Write atomically: a crash mid-write leaves the previous file intact, a full disk leaves no temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({**checkpoint, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}, tmp)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        kept = "previous checkpoint kept" if path.exists() else "no checkpoint written"
        if getattr(e, "errno", None) == errno.ENOSPC or any(m in str(e) for m in TORCH_WRITE_FAILURES):
            raise UserError(f"disk full writing {path}, {kept}: free some space (or pick another folder) "
                            "and run again") from None
        if isinstance(e, OSError):  # no permission, a read-only disk ...
            raise UserError(f"could not write {path} ({e.strerror or e}), {kept}: pick another folder") from None
        raise  # not a failed write: a bug, to be seen in full
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict at path, refusing missing, truncated and foreign files with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one first (python train.py) or pass --ckpt=PATH")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        if "Weights only load failed" in str(e):  # weights_only refused a pickled object: code could run on loading
            raise UserError(f"{path} was refused: it holds pickled Python objects (code could run on loading), "
                            "which a checkpoint of this project never has; load only files you trust") from None
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a torch file: {e.__class__.__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project (no '{CHECKPOINT_FORMAT}' marker)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint version {checkpoint.get('version')}, this code reads {CHECKPOINT_VERSION}")
    if "model" not in checkpoint or "model_config" not in checkpoint:
        raise UserError(f"{path} holds no model (no 'model' and 'model_config' entries)")
    drop_retired_pooling_keys(checkpoint["model_config"], path)
    return checkpoint


RETIRED_POOLING_KEYS = ("encoder_layers", "decoder_layers", "pooling")  # the earlier, per-chunk pooled design's


def drop_retired_pooling_keys(model_config, path):
    """Every checkpoint from before the flat pooled model holds these keys: a token model loads without them."""
    if model_config.get("embedder") == "pooled" and "pooling" in model_config:
        raise UserError(f"{path} is a pooled model of the earlier design (a byte decoder per chunk), which this code "
                        "no longer runs: train a new one with --embedder=pooled on bytes data")
    for key in RETIRED_POOLING_KEYS:
        model_config.pop(key, None)


# ----------------------------------------------------------------------------
# what a training checkpoint holds

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
    state.seconds = checkpoint.get("seconds", 0.0)  # none in checkpoints from before --max_seconds


def all_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------
# the run's folder: fresh or resumed

def check_fresh_out_dir(config):
    """A fresh run must not silently replace another run's checkpoint and mix into its log."""
    out_dir = Path(config.out_dir)
    used = [name for name in (CHECKPOINT_NAME, METRICS_NAME) if (out_dir / name).exists()]
    if used and not config.overwrite:
        raise UserError(f"{out_dir} already holds a run ({used[0]}): continue it with --resume, "
                        f"replace it with --overwrite, or pick another --out_dir")


def resumed_settings(checkpoint, train_keys, assigned):
    """
    The settings of a resumed run: the stored ones, except what this command
    line sets and the local keys, which always come from the command line.
    """
    stored = {k: v for k, v in checkpoint.get("train_config", {}).items() if k in train_keys and k not in LOCAL_KEYS}
    return {**stored, **{k: v for k, v in assigned.items() if k in train_keys}}


def check_resume_step(config, checkpoint):
    if config.max_iters < checkpoint["step"]:
        raise UserError(f"--max_iters={config.max_iters} is below the checkpoint's step {checkpoint['step']}: "
                        f"pass a larger --max_iters to train on, or none to keep {checkpoint['train_config']['max_iters']}")


def data_identity(meta):
    """What the data is, without where its files were."""
    return {k: v for k, v in meta.items() if k not in DATA_PATH_KEYS}


def check_same_data(checkpoint_meta, meta, dataset_name):
    """A resume must continue on exactly the data the model was trained on, or it is silently another experiment."""
    stored, current = data_identity(checkpoint_meta), data_identity(meta)
    differences = [f"{k} {stored.get(k)!r} -> {current.get(k)!r}" for k in sorted(stored.keys() | current.keys())
                   if stored.get(k) != current.get(k)]
    if differences:
        raise UserError(f"{dataset_name} is not the data the checkpoint was trained on ({'; '.join(differences[:3])}): "
                        f"resume on that data, or start a new run with --out_dir")


class MetricsLog:
    """
    out_dir/metrics.jsonl, one JSON record per line. Opened at step s, it keeps
    only the records up to s: a fresh run (s = 0) starts empty, and a resumed
    one drops what was logged after its checkpoint, so each step is there once.
    """

    def __init__(self, out_dir, step):
        self.path = Path(out_dir) / METRICS_NAME
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if self._step(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    @staticmethod
    def _step(line):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill mid-write
            return math.inf

    def write(self, record):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk, most likely: the checkpoint on disk is still the last good one
            raise UserError(f"could not write {self.path} ({e.strerror or e}): the last checkpoint beside it is "
                            "kept; free some space and continue with --resume") from None


# ----------------------------------------------------------------------------
# stopping: on a signal, at a step boundary; on divergence, without saving

class StopRequests:
    """
    While active, SIGINT (Ctrl-C) and SIGTERM (what schedulers, laptops and
    torchrun send) set a flag instead of raising in the middle of a step; the
    loop asks `requested()` between steps. A second Ctrl-C raises
    KeyboardInterrupt at once: the user insists. Only the main thread may
    install handlers; elsewhere signals keep their usual behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self.previous = {}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, dist, device):
        """Whether to stop now; under DDP every process stops at the same step when any one was signalled."""
        if dist.world_size == 1:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flag.item()) or None
        return self.signum is not None

    @property
    def exit_status(self):
        return 128 + self.signum  # the shell's convention for "ended by this signal"


def diverged(what, value, step, last_saved):
    """The one-line error of a run whose loss (or weights) stopped being finite: nothing is saved."""
    kept = f"the last good checkpoint ({last_saved}) is kept" if last_saved else "no checkpoint was written"
    shown = value if isinstance(value, str) else ("nan" if math.isnan(value) else f"{value}")
    return UserError(f"training diverged at step {step}: the {what} is {shown}; {kept}: "
                     "lower --learning_rate (or --warmup_iters longer) and start again")
