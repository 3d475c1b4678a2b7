"""
Muon (Keller Jordan et al. 2024, modded-nanogpt's optimizer) as train.py uses it:
momentum, then each weight matrix's update is orthogonalized by a Newton-Schulz
iteration, so every direction of the matrix learns at the same rate. Built on
torch.optim.Muon's groups, state and checkpoint format; and Optimizers, which
steps and checkpoints it together with the AdamW that trains everything else.
"""

import math

import torch

from cli import UserError

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
