"""
How train.py updates the weights: the optimizers, the learning-rate schedule,
and the wall-clock budget the schedule can follow.

- Muon (Keller Jordan et al. 2024, modded-nanogpt's optimizer) for the core's
  weight matrices: momentum, then each matrix's update is orthogonalized by a
  Newton-Schulz iteration, so every direction of the matrix learns at the same
  rate. Built on torch.optim.Muon's groups, state and checkpoint format.
- AdamW for everything else (embeddings, head, norm gains, biases), or for
  everything with --optimizer=adamw; Optimizers steps and checkpoints the two
  together.
- Linear warmup then a cosine to min_lr, over steps or over a time budget.
"""

import math
import time

import torch
import torch.nn as nn

from cli import UserError
from byte_tokenizer import ByteBlock
from model import GPT, CausalSelfAttention

MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (and modded-nanogpt's) quintic
MUON_EPS = 1e-7


def orthogonalize(update, steps, dtype):
    """
    Newton-Schulz iteration towards U V^T of update = U S V^T, with torch.optim.Muon's
    coefficients (Keller Jordan's quintic: singular values land in about [0.5, 1.5]).
    """
    a, b, c = MUON_NS_COEFFICIENTS
    x = update.to(dtype)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=MUON_EPS)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.T).to(update.dtype)


class Muon(torch.optim.Muon):
    """
    torch.optim.Muon's groups, momentum buffers and state dict, with two
    changes measured to matter here: Newton-Schulz runs in `ns_dtype`
    (torch always uses bf16, 2.7x slower than float32 on a CPU without
    AVX512-BF16), and a group's `row_blocks` (the fused c_attn: q, k, v
    stacked) are orthogonalized one by one, as modded-nanogpt does, since
    q, k and v are three separate linear maps.
    """

    def __init__(self, params, ns_dtype=torch.float32, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
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
                # Keller Jordan's scale: a tall block's orthogonal rows are shorter, so its step grows by sqrt(rows/cols)
                update = torch.cat([orthogonalize(block, group["ns_steps"], self.ns_dtype)
                                    * math.sqrt(max(1.0, block.size(0) / block.size(1))) for block in blocks])
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay, as in torch
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
            raise UserError("the checkpoint was trained with another --optimizer: resume with the one it used")
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(optimizer_state)


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
    The parameters Muon updates: the 2-D weight matrices of every GPT in
    model, the core's and a pooled model's byte layers'. Embedding tables and
    the head (rows are tokens or positions, not a linear map to orthogonalize),
    norm gains and biases stay with AdamW, as in modded-nanogpt.
    """
    chosen = []
    for gpt in (m for m in model.modules() if isinstance(m, GPT)):
        tables = [m for m in gpt.modules() if isinstance(m, nn.Embedding)] + [gpt.lm_head]
        outer = {id(p) for m in tables for p in m.parameters()}
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
    qkv_blocks.update({id(m.qkv.weight): [m.qkv.in_features] * 3 for m in model.modules() if isinstance(m, ByteBlock)})
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

    CLOCKS = {"wall": lambda: time.perf_counter(), "cpu": lambda: time.process_time()}  # looked up when read

    def __init__(self, max_seconds, seconds_before=0.0, clock="wall"):
        self.max_seconds = max_seconds
        self.seconds = seconds_before  # spent by earlier runs this one resumes
        self.now = self.CLOCKS[clock]
        self.last_tick = self.now()
        self.last_step_seconds = 0.0

    def __bool__(self):
        return self.max_seconds > 0

    def tick(self, was_step=True):
        """Count the time since the last tick (a training step, or not); returns the seconds spent in all."""
        now = self.now()
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
