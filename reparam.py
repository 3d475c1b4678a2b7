"""
Feed-forward blocks trained big and merged small, exactly.

At short sequence lengths the feed-forward block (FFN) dominates a small
model's latency. Dropping its nonlinearity makes it one d x d matrix: fast,
but a directly trained linear FFN learns worse. The fix studied here
("Exploring the Limits of Small Language Models"; RepVGG; ExpandNets) is to
*train* an over-parameterized form and *merge* it into the simple form after
training, with no change to the function the model computes:

- `linear`       one d x d matrix trained directly: the control.
- `rep_linear`   d -> hidden -> d with no nonlinearity. A product of linear
                 maps is one linear map: W2 W1.
- `rep_parallel` RepVGG's parallel branches, each with a learnable scale:
                 dense + low-rank + diagonal + identity. A sum of linear maps
                 is one linear map. No batch norm: its batch statistics would
                 mix positions and leak future tokens into the past.
- `rep_anneal`   a GELU FFN in which the activation of a fraction of the
                 hidden channels is blended into the identity over training.
                 Once they are exactly linear they merge into one d x d path,
                 leaving a narrower GELU FFN.

`reparameterize(model)` returns the merged inference model. Where a block owns
its FFN, the merge also folds the preceding norm's scale (and shift) into the
FFN's first matrix, so that norm keeps no parameters of its own; a shared FFN
(`share_ffn`) serves blocks with different norms, so there the norms stay.
Merge math runs in float64, so the merged weights are the training form's
function rounded once to the model's dtype.

    python reparam.py --ckpt=out/ckpt.pt      # merge, verify, save out/ckpt_merged.pt
    python bench.py --ckpts=out/ckpt.pt,out/ckpt_merged.pt   # time both side by side

The merged checkpoint loads like any other (sample.py, bench.py): its config
says `ffn_merged=True`, and model.py builds the inference modules from here.
This file needs nothing from model.py except in its command line, which
loads and saves whole models; timing is bench.py's job.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError, parse_config, run

FFN_TYPES = ("linear", "rep_linear", "rep_parallel", "rep_anneal")  # the FFNs this file builds for model.py
MERGEABLE = ("rep_linear", "rep_parallel", "rep_anneal")  # those with a training form to merge
LOW_RANK_DIVISOR = 4  # rep_parallel's low-rank branch has rank n_embd / 4
MERGE_DTYPE = torch.float64
MERGED_SUFFIX = "_merged"  # out/ckpt.pt -> out/ckpt_merged.pt
LOGIT_TOLERANCE = 1e-4  # max |logit difference| a merged fp32 model may show
VERIFY_BATCH = 4  # random windows whose logits are compared


def annealed_channels(config):
    """How many of rep_anneal's hidden channels become linear."""
    return round(config.anneal_fraction * config.hidden_dim)


def check_config(config):
    """Raise a UserError for reparameterization settings that describe no buildable model."""
    if (config.ffn_merged or config.ffn_norm_folded) and config.ffn not in MERGEABLE:
        raise UserError(f"--ffn_merged and --ffn_norm_folded describe a merged rep_* FFN, not --ffn={config.ffn}")
    if config.ffn_norm_folded and (not config.ffn_merged or config.share_ffn):
        raise UserError("--ffn_norm_folded needs --ffn_merged and an unshared FFN (a shared FFN serves several norms)")
    if config.ffn == "rep_anneal":
        if not 0 < annealed_channels(config) < config.hidden_dim:
            raise UserError(f"--anneal_fraction={config.anneal_fraction} must leave some but not all of "
                            f"{config.hidden_dim} hidden channels nonlinear")
        if config.anneal_iters < 1:
            raise UserError(f"--anneal_iters must be at least 1, got {config.anneal_iters}")


# ----------------------------------------------------------------------------
# inference forms: what a merged model runs

class LinearFFN(nn.Module):
    """One d x d matrix: the directly trained `linear` control, and merged rep_linear / rep_parallel."""

    input_layer = "c_proj"  # where a folded norm's scale and shift go

    def __init__(self, config):
        super().__init__()
        # named c_proj: it writes to the residual stream, so GPT gives it the depth-scaled init
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(x))


class GeluLinearFFN(nn.Module):
    """
    Merged rep_anneal: a narrower GELU FFN plus a d x d linear path. Both read
    the same input, so one matrix computes the GELU's inputs and the linear
    path's output together: one matmul instead of two.
    """

    input_layer = "c_fc"

    def __init__(self, config):
        super().__init__()
        self.n_gelu = config.hidden_dim - annealed_channels(config)
        self.c_fc = nn.Linear(config.n_embd, self.n_gelu + config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(self.n_gelu, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h, linear = self.c_fc(x).split([self.n_gelu, self.c_proj.out_features], dim=-1)
        return self.dropout(self.c_proj(F.gelu(h, approximate="tanh")) + linear)


# ----------------------------------------------------------------------------
# training forms and their merges; each merged_state() is its inference form's state dict in float64

def _weight_and_bias(linear):
    """A linear layer's weight and bias in float64; a missing bias as zeros, so the algebra needs no cases."""
    weight = linear.weight.detach().to(MERGE_DTYPE)
    bias = linear.bias.detach().to(MERGE_DTYPE) if linear.bias is not None else weight.new_zeros(weight.size(0))
    return weight, bias


def _linear_state(name, weight, bias, has_bias):
    state = {f"{name}.weight": weight}
    if has_bias:
        state[f"{name}.bias"] = bias
    else:
        assert not bias.any(), "a bias-free model produced a bias"
    return state


class RepLinearFFN(nn.Module):
    """d -> hidden -> d with no nonlinearity between: trained as two matrices, merged into their product."""

    inference_form = LinearFFN

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.c_fc(x)))

    def merged_state(self):
        w1, b1 = _weight_and_bias(self.c_fc)
        w2, b2 = _weight_and_bias(self.c_proj)
        # W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)
        return _linear_state("c_proj", w2 @ w1, w2 @ b1 + b2, self.c_proj.bias is not None)


class RepParallelFFN(nn.Module):
    """
    dense + low-rank + diagonal + identity branches on the same input, each
    multiplied by a learnable scalar; merged by adding up their matrices.
    """

    inference_form = LinearFFN

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        rank = max(1, d // LOW_RANK_DIVISOR)
        self.c_proj = nn.Linear(d, d, bias=config.bias)  # the dense branch
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, d, bias=False)
        self.diagonal = nn.Parameter(torch.ones(d))
        # dense and low-rank start on; the diagonal and identity branches start
        # at zero so the block begins as an ordinary small-init FFN, and grow if they help
        self.scales = nn.Parameter(torch.tensor([1.0, 1.0, 0.0, 0.0]))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        dense, low_rank, diagonal, identity = self.scales
        y = dense * self.c_proj(x) + low_rank * self.up(self.down(x)) + (diagonal * self.diagonal + identity) * x
        return self.dropout(y)

    def merged_state(self):
        dense, low_rank, diagonal, identity = self.scales.detach().to(MERGE_DTYPE)
        w, b = _weight_and_bias(self.c_proj)
        up, down = self.up.weight.detach().to(MERGE_DTYPE), self.down.weight.detach().to(MERGE_DTYPE)
        per_channel = diagonal * self.diagonal.detach().to(MERGE_DTYPE) + identity  # diagonal + identity branches
        merged = dense * w + low_rank * (up @ down) + torch.diag(per_channel)
        return _linear_state("c_proj", merged, dense * b, self.c_proj.bias is not None)


class RepAnnealFFN(nn.Module):
    """
    A GELU FFN whose last `annealed_channels(config)` hidden channels compute
    (1 - t) * gelu(h) + t * h, with t going from 0 to 1 over anneal_iters
    training steps. At t = 1 those channels are linear and merge into one d x d
    matrix; the other channels keep their GELU.

    The schedule's clock is a buffer holding the optimizer steps done, set by
    train.py through GPT.set_step, and saved in checkpoints with the weights.
    """

    inference_form = GeluLinearFFN

    def __init__(self, config):
        super().__init__()
        self.n_linear = annealed_channels(config)
        self.n_gelu = config.hidden_dim - self.n_linear
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.anneal_iters = config.anneal_iters
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def progress(self):
        """
        The schedule's position t in [0, 1]: how far the annealed channels are
        from GELU (0) to the identity (1), as a tensor (no host sync on a GPU).
        """
        # integers divided in float64: t is exactly 1 from anneal_iters on
        return (self.steps_done.to(MERGE_DTYPE) / self.anneal_iters).clamp(max=1.0)

    def forward(self, x):
        h = self.c_fc(x)
        nonlinear, annealed = h.split([self.n_gelu, self.n_linear], dim=-1)
        annealed = torch.lerp(F.gelu(annealed, approximate="tanh"), annealed, self.progress().to(h.dtype))
        return self.dropout(self.c_proj(torch.cat([F.gelu(nonlinear, approximate="tanh"), annealed], dim=-1)))

    def merged_state(self):
        if self.progress().item() < 1.0:
            raise UserError(f"rep_anneal has annealed for {self.steps_done.item()} of {self.anneal_iters} steps: its channels are "
                            f"not linear yet, so it cannot merge exactly; train to at least --anneal_iters")
        w1, b1 = _weight_and_bias(self.c_fc)
        w2, b2 = _weight_and_bias(self.c_proj)
        w1_gelu, w1_linear = w1.split([self.n_gelu, self.n_linear])
        b1_gelu, b1_linear = b1.split([self.n_gelu, self.n_linear])
        w2_gelu, w2_linear = w2.split([self.n_gelu, self.n_linear], dim=1)
        # the linear channels: W2_lin (W1_lin x + b1_lin) = (W2_lin W1_lin) x + W2_lin b1_lin,
        # stacked under the GELU channels' rows of the input matrix
        c_fc_weight = torch.cat([w1_gelu, w2_linear @ w1_linear])
        c_fc_bias = torch.cat([b1_gelu, w2_linear @ b1_linear])
        has_bias = self.c_fc.bias is not None
        return {**_linear_state("c_fc", c_fc_weight, c_fc_bias, has_bias),
                **_linear_state("c_proj", w2_gelu, b2, has_bias)}


def complete_anneal(model):
    """
    Move every rep_anneal FFN's schedule to its end, so an untrained model can
    be merged (for timing shapes, as bench.py does); a trained one gets there by training.
    """
    for module in model.modules():
        if isinstance(module, RepAnnealFFN):
            module.steps_done.fill_(module.anneal_iters)
    return model


def make_ffn(config):
    """The FFN module for config.ffn (one of FFN_TYPES), in its merged form if config.ffn_merged."""
    check_config(config)
    if config.ffn == "linear":
        return LinearFFN(config)
    if config.ffn == "rep_linear":
        return LinearFFN(config) if config.ffn_merged else RepLinearFFN(config)
    if config.ffn == "rep_parallel":
        return LinearFFN(config) if config.ffn_merged else RepParallelFFN(config)
    if config.ffn == "rep_anneal":
        return GeluLinearFFN(config) if config.ffn_merged else RepAnnealFFN(config)
    raise ValueError(f"reparam.make_ffn does not build ffn={config.ffn!r}")


# ----------------------------------------------------------------------------
# merging a whole model

def fold_norm(state, layer, norm):
    """
    Fold a norm's elementwise scale g and shift s into the layer reading its output:
    W (g * n + s) + b = (W diag(g)) n + (W s + b).
    """
    weight = state[f"{layer}.weight"]
    scale = norm.weight.detach().to(MERGE_DTYPE)
    shift = getattr(norm, "bias", None)  # LayerNorm with bias=True; RMSNorm has none
    folded = {**state, f"{layer}.weight": weight * scale}
    if shift is not None:
        folded[f"{layer}.bias"] = state[f"{layer}.bias"] + weight @ shift.detach().to(MERGE_DTYPE)
    return folded


def merge_block_ffn(ffn, norm=None):
    """The inference-form state dict (float64) of a training-form FFN; with `norm`, its affine folded in."""
    state = ffn.merged_state()
    return fold_norm(state, ffn.inference_form.input_layer, norm) if norm is not None else state


def reparameterize(model):
    """
    A new model, in eval mode, that computes what `model` computes with every
    rep_* FFN merged into its inference form. `model` is left unchanged.
    Raises a UserError if there is nothing to merge.
    """
    config = model.config
    if config.ffn_merged:
        raise UserError(f"this model's {config.ffn} FFN is already merged: nothing left to merge")
    if config.ffn not in MERGEABLE:
        raise UserError(f"nothing to merge: ffn={config.ffn} has no training-time form "
                        f"(reparameterizable FFNs: {', '.join(MERGEABLE)})")
    fold = not config.share_ffn
    merged_config = dataclasses.replace(config, ffn_merged=True, ffn_norm_folded=fold)
    reference = next(model.parameters())
    with torch.random.fork_rng(devices=[]):  # building a model draws init weights: leave the caller's RNG alone
        merged = type(model)(merged_config).to(device=reference.device, dtype=reference.dtype)
    target_keys = merged.state_dict().keys()
    state = {k: v for k, v in model.state_dict().items() if k in target_keys}  # everything outside the FFNs
    shared_state = merge_block_ffn(model.h[0].mlp) if config.share_ffn else None
    for i, block in enumerate(model.h):
        ffn_state = shared_state or merge_block_ffn(block.mlp, block.ln_2)
        state.update({f"h.{i}.mlp.{k}": v.to(reference.dtype) for k, v in ffn_state.items()})
    merged.load_state_dict(state)  # strict: every merged tensor accounted for, no stale ones
    return merged.eval()


def forward_flops(model, seq_len):
    """FLOPs of one forward pass over a random (1, seq_len) input, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)  # the same input for every model compared
    idx = random_inputs(model.config, 1, seq_len, generator).to(device)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(idx)
    return counter.get_total_flops()


def random_inputs(config, batch, seq_len, generator):
    """Random token ids (batch, seq_len) the model accepts (a pooled model's are bytes)."""
    return torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)


# ----------------------------------------------------------------------------
# command line: merge a checkpoint, verify it, save it (bench.py times it)

@dataclass
class ReparamConfig:
    ckpt: str = "out/ckpt.pt"
    out: str = ""  # the merged checkpoint; "" = next to ckpt, as ckpt_merged.pt
    verify_tokens: int = 64  # greedy tokens the merged model must reproduce exactly
    threads: int = 0  # CPU threads for torch; 0 = every core
    seed: int = 1337


def max_logit_difference(model, merged, idx):
    with torch.inference_mode():
        return (model(idx)[0] - merged(idx)[0]).abs().max().item()


def verify(model, merged, config, generator):
    """
    Compare logits on random inputs, and greedy generations from a random
    prompt; raise a UserError on any mismatch. A merge is an algebraic
    identity, so random inputs test it as well as real text would.
    """
    idx = random_inputs(model.config, VERIFY_BATCH, model.config.block_size, generator)
    diff = max_logit_difference(model, merged, idx)
    print(f"max |logit difference| on random inputs: {diff:.2e} (tolerance {LOGIT_TOLERANCE:.0e})")
    if not diff <= LOGIT_TOLERANCE:
        raise UserError(f"merged model differs from the original by {diff:.2e}: not saved")
    prompt = idx[:1, : model.config.block_size // 2]
    greedy = [m.generate(prompt, config.verify_tokens, temperature=0) for m in (model, merged)]
    if not torch.equal(*greedy):
        raise UserError(f"merged model's {config.verify_tokens} greedy tokens differ from the original's: not saved")
    print(f"{config.verify_tokens} greedy tokens: identical")


def main(argv=None):
    # model.py imports this file for its FFNs, so only the command line, which needs whole models, imports it back
    from model import load_checkpoint, model_from_checkpoint, save_checkpoint
    config = ReparamConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    torch.set_num_threads(config.threads or os.cpu_count())
    checkpoint = load_checkpoint(config.ckpt)
    model = model_from_checkpoint(checkpoint)
    merged = reparameterize(model)
    print(f"merged {model.config.ffn} FFNs of {config.ckpt}"
          f"{' (norms folded in)' if merged.config.ffn_norm_folded else ' (shared FFN: norms kept)'}")
    verify(model, merged, config, torch.Generator().manual_seed(config.seed))

    ckpt = Path(config.ckpt)
    out = Path(config.out) if config.out else ckpt.with_name(ckpt.stem + MERGED_SUFFIX + ckpt.suffix)
    # an inference checkpoint: no optimizer, so it is not for --resume
    keep = {k: checkpoint[k] for k in ("train_config", "step", "data_meta") if k in checkpoint}
    save_checkpoint({**keep, "model": merged.state_dict(), "model_config": dataclasses.asdict(merged.config),
                     "merged_from": str(config.ckpt)}, out)
    print(f"saved {out}")

    print(f"\n{'':<10} {'parameters':>12} {'core':>10} {'GFLOP/forward':>14}")
    for name, m in (("original", model), ("merged", merged)):
        counts = m.num_params()
        gflops = forward_flops(m, m.config.block_size) / 1e9
        print(f"{name:<10} {counts['total']:>12,} {counts['core']:>10,} {gflops:>14.4f}")
    print(f"time both, side by side: python bench.py --ckpts={ckpt},{out}")


if __name__ == "__main__":
    run(main)
