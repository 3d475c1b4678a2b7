"""
How train.py updates the weights: Muon for the core's weight matrices and AdamW
for the rest (or AdamW for everything), the learning-rate schedule, and the
time budget the schedule can follow instead of a step count.
"""

import math
import time

import torch
import torch.nn as nn

from cli import UserError
from byte_tokenizer import ByteBlock
from model import GPT, CausalSelfAttention

# AdamW's moment decays: a small model sees few tokens per step, so a shorter second-moment memory
# (0.99, not GPT-2's 0.999) follows its fast-changing gradients better; 0.9 is the usual first moment
ADAMW_BETAS = (0.9, 0.99)
# Muon's momentum: modded-nanogpt's and torch.optim.Muon's default, what its Newton-Schulz is tuned for
MUON_MOMENTUM = 0.95


def orthogonalize(updates, steps, dtype):
    """
    Newton-Schulz iteration towards U V^T of each matrix update = U S V^T of a batch (n, rows,
    cols), with torch.optim.Muon's coefficients (Keller Jordan's quintic: singular values land
    in about [0.5, 1.5]).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = updates.to(dtype)
    # iterate on the smaller Gram matrix
    wide = x.size(-2) <= x.size(-1)
    x = x if wide else x.mT
    # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.mT).to(updates.dtype)


def orthogonalize_all(updates, steps, dtype):
    """
    orthogonalize of each matrix in the list updates, with its number of steps: matrices of one
    shape and step count go through the iteration together, one batched matmul for all of them.
    """
    batches = {}
    for i, (update, n) in enumerate(zip(updates, steps)):
        batches.setdefault((update.shape, n), []).append(i)
    results = [None] * len(updates)
    for (_, n), indices in batches.items():
        for i, result in zip(indices, orthogonalize(torch.stack([updates[i] for i in indices]), n, dtype)):
            results[i] = result
    return results


def native_bf16(device):
    """Whether device multiplies bf16 matrices natively: a GPU, or a CPU with AVX512-BF16 or AMX."""
    if device.startswith("cuda"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class Muon(torch.optim.Muon):
    """
    torch.optim.Muon's groups, momentum buffers and state dict, with three
    changes measured to matter here: Newton-Schulz runs in `ns_dtype` (torch
    always uses bf16, far slower than float32 on a CPU without AVX512-BF16),
    over all matrices of one shape at once (a tiny model's matrices are too
    small to keep a CPU busy one by one), and a group's `row_blocks` (the
    fused c_attn: q, k, v stacked) are orthogonalized one by one, as
    modded-nanogpt does, since q, k and v are three separate linear maps.
    """

    def __init__(self, params, ns_dtype=torch.float32, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        # momentum, and the blocks of every update
        todo = []  # (parameter, its group, its update's blocks)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                blocks = update.split(group["row_blocks"]) if group.get("row_blocks") else [update]
                todo.append((p, group, blocks))
        # every block orthogonalized, then each parameter's update put back together and applied
        steps = [group["ns_steps"] for _, group, blocks in todo for _ in blocks]
        orthogonal = iter(orthogonalize_all([b for *_, blocks in todo for b in blocks], steps, self.ns_dtype))
        for p, group, blocks in todo:
            # Keller Jordan's scale: a tall block's orthogonal rows are shorter, so its step grows
            # by sqrt(rows / cols)
            update = torch.cat([next(orthogonal) * math.sqrt(max(1.0, b.size(0) / b.size(1))) for b in blocks])
            # decoupled weight decay, as in torch
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"])


class Optimizers:
    """Several optimizers over disjoint parameters, stepped and checkpointed as one."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise UserError("the checkpoint was trained with another --optimizer: resume with its own")
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(optimizer_state)


# ----------------------------------------------------------------------------
# optimisation

def learning_rate(step, config, decay_iters, budget_spent=None):
    """
    Linear warmup, then cosine decay from learning_rate to min_lr at step
    decay_iters (the first run's max_iters: a resume keeps the schedule);
    under a time budget (max_seconds) the cosine runs over budget_spent
    instead, the share of the budget used once this step is done, and reaches
    min_lr at 1.
    """
    warmup = config.learning_rate * (step + 1) / max(1, config.warmup_iters)
    if budget_spent is not None:
        # the smaller of the two: a budget that ends during the warmup still ends at min_lr
        return min(warmup, cosine_decay(budget_spent, config))
    if step < config.warmup_iters:
        return warmup
    progress = (step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    return cosine_decay(progress, config)


def cosine_decay(progress, config):
    """learning_rate at progress 0, min_lr at 1 and beyond."""
    progress = min(1.0, progress)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr + cosine * (config.learning_rate - config.min_lr)


OPTIMIZERS = ("adamw", "muon")


def muon_matrices(model):
    """
    The parameters Muon updates: the 2-D weight matrices of every GPT in
    model, the core's and a pooled model's byte layers'. Embedding tables and
    the head (rows are tokens or positions, not a linear map to orthogonalize),
    norm gains and biases stay with AdamW, as in modded-nanogpt.
    """
    chosen = []
    for gpt in (m for m in model.modules() if isinstance(m, GPT)):
        tables = [m for m in gpt.modules() if isinstance(m, nn.Embedding)] + [gpt.lm_head]
        outer = {id(p) for m in tables for p in m.parameters()}
        chosen += [p for p in gpt.parameters()
                   if p.dim() == 2 and id(p) not in outer and p.requires_grad]
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
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay,
         "lr_scale": 1.0},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    # fused: one kernel for all parameters instead of about a dozen operations per tensor
    adamw = torch.optim.AdamW(groups, lr=config.learning_rate, betas=ADAMW_BETAS, fused=True)
    if not muon_ids:
        return adamw
    # Muon (Jordan et al. 2024, modded-nanogpt's optimizer): momentum, then each weight matrix's
    # update is orthogonalized, so every direction of the matrix learns at the same rate
    qkv_blocks = {id(m.c_attn.weight): [m.n_head * m.head_dim] + [m.n_kv_head * m.head_dim] * 2
                  for m in model.modules() if isinstance(m, CausalSelfAttention)}
    qkv_blocks.update({id(m.qkv.weight): [m.qkv.in_features] * 3
                       for m in model.modules() if isinstance(m, ByteBlock)})
    groups = []
    for p in (p for p in params if id(p) in muon_ids):
        group = {"params": [p], "lr_scale": config.muon_lr / config.learning_rate}
        if id(p) in qkv_blocks:
            group["row_blocks"] = qkv_blocks[id(p)]
        groups.append(group)
    # bf16 Newton-Schulz wherever bf16 matrices multiply natively (twice float32's speed on such a
    # CPU, measured); float32 elsewhere
    ns_dtype = torch.bfloat16 if config.bf16 or native_bf16(device) else torch.float32
    muon = Muon(groups, ns_dtype=ns_dtype, lr=config.muon_lr, weight_decay=config.weight_decay,
                momentum=MUON_MOMENTUM)
    return Optimizers(adamw, muon)


# ----------------------------------------------------------------------------
# a time budget: wall-clock, or the process's CPU time

class TimeBudget:
    """
    Seconds spent in the loop, and the share of max_seconds the next step
    will have used once done, predicted from the last step's duration: the
    schedule reaches its end (min_lr) on the step that reaches the budget,
    and the loop stops there, within one step of it. clock: "wall", or "cpu"
    (this process's CPU time, summed over its threads: on a machine shared
    with other busy programs, runs compared at equal CPU time and the same
    --threads get equal work, whoever else was running).
    """

    # lambdas: the clock is looked up when read, so a test can replace time.perf_counter
    CLOCKS = {"wall": lambda: time.perf_counter(), "cpu": lambda: time.process_time()}

    def __init__(self, max_seconds, seconds_before=0.0, clock="wall"):
        self.max_seconds = max_seconds
        # the seconds spent by the earlier runs this one resumes count too
        self.seconds = seconds_before
        self.now = self.CLOCKS[clock]
        self.last_tick = self.now()
        self.last_step_seconds = 0.0

    def __bool__(self):
        return self.max_seconds > 0

    def tick(self, was_step=True):
        """Count the time since the last tick (a training step, or not); returns all seconds spent."""
        now = self.now()
        if was_step:
            self.last_step_seconds = now - self.last_tick
        self.seconds += now - self.last_tick
        self.last_tick = now
        return self.seconds

    def spent_after_next_step(self, dist):
        """The share of the budget spent once the next step is done; None without a budget."""
        if not self:
            return None
        spent = torch.tensor((self.seconds + self.last_step_seconds) / self.max_seconds)
        # the main process's prediction for all: every process stops on the same step
        if dist.world_size > 1:
            torch.distributed.broadcast(spent, 0)
        return spent.item()
