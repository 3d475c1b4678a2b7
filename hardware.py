"""
Where a run executes: the torch device, its processes under torchrun, how
many CPU threads, and whether training fits in memory. Every script picks its
device and threads here.

Why threads need care: torch splits each CPU operation evenly over its
threads (OpenMP), and each operation waits for the slowest one. A thread that
shares its core with another busy program gets that core in scheduler slices
of milliseconds, far longer than one of a tiny model's operations, so nearly
every operation waits: on 2 cores with one other busy program the quick start
took 760 s with 2 threads instead of about 100 s. So --threads=0 (the
default) uses the cores that are idle when the run starts, not every core. A
program that starts later is not seen: on a shared machine pass --threads=1.
"""

import os
import re
import time
from dataclasses import dataclass

import torch

from cli import UserError

CUDA_NAME = re.compile(r"cuda(:\d+)?")
IDLE_SAMPLE_S = 0.2  # how long to watch the CPUs before choosing the thread count
IDLE_CORE_FRACTION = 0.5  # a core counts as free when at least this much of it was idle
# training memory per token and layer, in floats of width n_embd kept for the backward pass (attention
# inputs and outputs, norms, a 4x FFN and the gradients passing through them): a rough upper bound
ACTIVATION_FLOATS_PER_WIDTH = 34
TRAINING_FLOATS_PER_PARAM = 4  # weights, gradients and AdamW's two moments
BYTES_PER_FLOAT = 4


def pick_device(name):
    """The torch device for --device=auto|cpu|cuda|cuda:N, refusing what this machine does not have."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if not CUDA_NAME.fullmatch(name):
        raise UserError(f"--device={name} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device={name} but torch sees no CUDA GPU: use --device=cpu")
    if int(name.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name} but torch sees {torch.cuda.device_count()} GPU(s): "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return name


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
# CPU threads

def usable_cores():
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times():
    """(idle, total) jiffies summed over all CPUs, from /proc/stat; None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return values[3] + values[4], sum(values)  # idle + iowait


def idle_cores(cores, seconds=IDLE_SAMPLE_S):
    """How many of `cores` were idle (rounded down) over the next `seconds`; all of them where that cannot be told."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return cores
    idle_fraction = (after[0] - before[0]) / (after[1] - before[1])
    return int(idle_fraction * (os.cpu_count() or cores) + (1 - IDLE_CORE_FRACTION))


def set_cpu_threads(requested=0, local_processes=1):
    """
    Set torch's CPU threads: `requested`, or for 0 this process's share of
    the usable cores that are idle now (at least 1). Returns the number.
    """
    threads = requested
    if not threads:
        cores = usable_cores()
        threads = max(1, min(cores, idle_cores(cores)) // local_processes)
    torch.set_num_threads(threads)
    return threads


# ----------------------------------------------------------------------------
# memory

def training_memory_bytes(config, batch_size):
    """
    A rough upper bound on training memory in float32: parameters with their
    gradients and AdamW moments, plus the activations the backward pass keeps
    (ACTIVATION_FLOATS_PER_WIDTH x n_embd per token per block application, and
    the logits with their gradient). Attention runs in fused kernels that keep
    no block_size x block_size matrix.
    """
    width, tokens = config.n_embd, batch_size * config.block_size
    params = 12 * config.n_layer * width * width + (config.vocab_size + config.block_size) * width
    activations = tokens * (config.n_layer * config.block_repeat * ACTIVATION_FLOATS_PER_WIDTH * width
                            + 2 * config.vocab_size)
    return BYTES_PER_FLOAT * (TRAINING_FLOATS_PER_PARAM * params + activations)


def available_memory_bytes(device):
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:  # Linux: what can be had without swapping
            return int(next(line.split()[1] for line in f if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config, batch_size, device):
    """Refuse a shape that cannot train here: one line now rather than swapping, or hanging, at step 0."""
    need, have = training_memory_bytes(config, batch_size), available_memory_bytes(device)
    if need > have:
        raise UserError(f"--block_size={config.block_size} with --batch_size={batch_size} needs about "
                        f"{need / 2**30:.1f} GiB to train, more than the {have / 2**30:.1f} GiB free on {device}: "
                        "lower them (--grad_accum keeps the batch)")
