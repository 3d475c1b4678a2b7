"""
Feed-forward blocks trained big and merged small, exactly.

At short sequence lengths the feed-forward block (FFN) dominates a small
model's latency. Dropping its nonlinearity makes it one d x d matrix: fast,
but a directly trained linear FFN learns worse. The fix studied here
("Exploring the Limits of Small Language Models"; RepVGG; ExpandNets) is to
*train* an over-parameterized form and *merge* it into the simple form after
training, with no change to the function the model computes. The training
forms are model.py's modules; this file holds their algebra:

- `rep_linear`   d -> hidden -> d with no nonlinearity: W2 (W1 x + b1) + b2 is
                 one linear map, merged into a `linear` FFN.
- `rep_parallel` dense + low-rank + diagonal + identity branches, each times a
                 learnable scalar: a sum of linear maps, merged into a `linear` FFN.
- `rep_anneal`   a GELU FFN whose annealed half of the channels ends exactly
                 linear: those merge into one d x d path beside the other half's
                 GELU, a `gelu_linear` FFN.

Merges run in float64, so the merged weights are the training form's function
rounded once to the model's dtype. The merged checkpoint is an ordinary
`linear` or `gelu_linear` model: sample.py and bench.py load it like any other.

    python reparam.py --ckpt=out/ckpt.pt      # merge, verify, save out/ckpt_merged.pt
    python bench.py --ckpts=out/ckpt.pt,out/ckpt_merged.pt   # time both side by side
"""

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError, parse_config, run, set_threads
from model import load_checkpoint, model_from_checkpoint, save_checkpoint

# The largest |logit difference| a merged float32 model may show. Both forms round at every float32
# operation (unit roundoff 6e-8), in sums of hundreds of terms, on logits of order 10: they differ by
# about 1e-6 to 1e-5. A wrong merge (a lost branch, a transposed matrix) is off by 1e-2 or more.
LOGIT_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------
# one FFN: its training form's weights -> its inference form's, in float64

def _weight_and_bias(linear):
    """A linear layer's weight and bias in float64; a missing bias as zeros, so the algebra has no cases."""
    weight = linear.weight.detach().to(torch.float64)
    if linear.bias is None:
        return weight, weight.new_zeros(weight.size(0))
    return weight, linear.bias.detach().to(torch.float64)


def _linear_state(name, weight, bias, has_bias):
    state = {f"{name}.weight": weight}
    if has_bias:
        state[f"{name}.bias"] = bias
    else:
        assert not bias.any(), "a bias-free model produced a bias"
    return state


def merge_rep_linear(ffn):
    """A rep_linear FFN (model.FFN with no activation) as the float64 state of a linear FFN: one c_proj."""
    w1, b1 = _weight_and_bias(ffn.c_fc)
    w2, b2 = _weight_and_bias(ffn.c_proj)
    # W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)
    return _linear_state("c_proj", w2 @ w1, w2 @ b1 + b2, ffn.c_proj.bias is not None)


def merge_rep_parallel(ffn):
    """A RepParallelFFN's four scaled branches as the float64 state of a linear FFN: one c_proj."""
    dense, low_rank, diagonal, identity = ffn.scales.detach().to(torch.float64)
    w, b = _weight_and_bias(ffn.c_proj)
    up, down = ffn.up.weight.detach().to(torch.float64), ffn.down.weight.detach().to(torch.float64)
    # the diagonal and identity branches scale each channel: together one diagonal matrix
    per_channel = diagonal * ffn.diagonal.detach().to(torch.float64) + identity
    merged = dense * w + low_rank * (up @ down) + torch.diag(per_channel)
    return _linear_state("c_proj", merged, dense * b, ffn.c_proj.bias is not None)


def merge_rep_anneal(ffn):
    if ffn.progress().item() < 1.0:
        raise UserError(f"rep_anneal has annealed for {ffn.steps_done.item()} of {ffn.anneal_iters} steps: "
                        "its channels are not linear yet, so it cannot merge exactly; train to at least "
                        "--anneal_iters")
    w1, b1 = _weight_and_bias(ffn.c_fc)
    w2, b2 = _weight_and_bias(ffn.c_proj)
    w1_gelu, w1_linear = w1.split([ffn.n_gelu, ffn.n_linear])
    b1_gelu, b1_linear = b1.split([ffn.n_gelu, ffn.n_linear])
    w2_gelu, w2_linear = w2.split([ffn.n_gelu, ffn.n_linear], dim=1)
    # the linear channels: W2_lin (W1_lin x + b1_lin) = (W2_lin W1_lin) x + W2_lin b1_lin,
    # stacked under the GELU channels' rows of the input matrix
    c_fc_weight = torch.cat([w1_gelu, w2_linear @ w1_linear])
    c_fc_bias = torch.cat([b1_gelu, w2_linear @ b1_linear])
    has_bias = ffn.c_fc.bias is not None
    return {**_linear_state("c_fc", c_fc_weight, c_fc_bias, has_bias),
            **_linear_state("c_proj", w2_gelu, b2, has_bias)}


# the FFNs with a training form, and the merge that gives each one's inference form (float64 state)
MERGEABLE = {"rep_linear": merge_rep_linear, "rep_parallel": merge_rep_parallel,
             "rep_anneal": merge_rep_anneal}


def merged_config(config):
    """The config of the inference form: rep_linear and rep_parallel become linear, rep_anneal gelu_linear."""
    if config.ffn == "rep_anneal":
        n_gelu = config.hidden_dim - config.hidden_dim // 2
        return dataclasses.replace(config, ffn="gelu_linear", ffn_hidden=n_gelu)
    return dataclasses.replace(config, ffn="linear", ffn_hidden=0)


def complete_anneal(model):
    """
    Move every rep_anneal FFN's schedule to its end, so an untrained model can be merged
    (for timing shapes, as bench.py does); a trained one gets there by training.
    """
    model.set_step(model.config.anneal_iters)
    return model


# ----------------------------------------------------------------------------
# merging a whole model

def reparameterize(model):
    """
    A new model, in eval mode, that computes what `model` computes with every
    rep_* FFN merged into its inference form. `model` is left unchanged.
    Raises a UserError if there is nothing to merge.
    """
    if model.config.ffn not in MERGEABLE:
        raise UserError(f"nothing to merge: ffn={model.config.ffn} has no training-time form "
                        f"(reparameterizable FFNs: {', '.join(MERGEABLE)})")
    merge = MERGEABLE[model.config.ffn]
    reference = next(model.parameters())
    # building a model draws init weights: leave the caller's RNG alone
    with torch.random.fork_rng(devices=[]):
        merged = type(model)(merged_config(model.config)).to(device=reference.device, dtype=reference.dtype)
    # everything outside the FFNs as it is, then each block's FFN merged (a shared FFN once per block:
    # the same result each time)
    target_keys = merged.state_dict().keys()
    state = {k: v for k, v in model.state_dict().items() if k in target_keys}
    for i, block in enumerate(model.h):
        state.update({f"h.{i}.ffn.{k}": v.to(reference.dtype) for k, v in merge(block.ffn).items()})
    merged.load_state_dict(state)  # strict: every merged tensor accounted for, no stale ones
    return merged.eval()


def forward_flops(model, seq_len, idx=None):
    """
    FLOPs of one forward pass over idx (1, seq_len), or a random one, counted by torch's
    FlopCounterMode (a pooled model's depend on its text: its core runs once per chunk).
    """
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    if idx is None:
        generator = torch.Generator().manual_seed(0)  # the same input for every model compared
        idx = random_inputs(model.config, 1, seq_len, generator)
    idx = idx.to(device)
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
    threads: int = 0  # CPU threads for torch; 0 = the cores idle at the start
    seed: int = 1337


def verify(model, merged, config, generator):
    """
    Compare logits on random inputs, and greedy generations from a random
    prompt; raise a UserError on any mismatch. A merge is an algebraic
    identity, so random inputs test it as well as real text would.
    """
    idx = random_inputs(model.config, 4, model.config.block_size, generator)
    with torch.inference_mode():
        diff = (model(idx)[0] - merged(idx)[0]).abs().max().item()
    print(f"max |logit difference| on random inputs: {diff:.2e} (tolerance {LOGIT_TOLERANCE:.0e})")
    if not diff <= LOGIT_TOLERANCE:
        raise UserError(f"merged model differs from the original by {diff:.2e}: not saved")
    prompt = idx[:1, : model.config.block_size // 2]
    greedy = [m.generate(prompt, config.verify_tokens, temperature=0) for m in (model, merged)]
    if not torch.equal(*greedy):
        raise UserError(f"merged model's {config.verify_tokens} greedy tokens differ from the original's: "
                        "not saved")
    print(f"{config.verify_tokens} greedy tokens: identical")


def merged_path(config):
    """Where the merged checkpoint goes, refusing the checkpoint it is merged from."""
    ckpt = Path(config.ckpt)
    out = Path(config.out) if config.out else ckpt.with_name(ckpt.stem + "_merged" + ckpt.suffix)
    if out.resolve() == ckpt.resolve():
        raise UserError(f"--out={config.out} is the checkpoint being merged: the merged one has no "
                        "optimizer state, so that run could not be resumed; pick another --out")
    return out


def main(argv=None):
    config = ReparamConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    if config.verify_tokens < 1:
        raise UserError(f"--verify_tokens must be at least 1 (the merge is checked before it is saved), "
                        f"got {config.verify_tokens}")
    if not 0 <= config.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {config.seed}")
    out = merged_path(config)
    set_threads(config.threads)
    checkpoint = load_checkpoint(config.ckpt)
    model = model_from_checkpoint(checkpoint)
    merged = reparameterize(model)
    print(f"merged the {model.config.ffn} FFNs of {config.ckpt} into {merged.config.ffn} FFNs")
    verify(model, merged, config, torch.Generator().manual_seed(config.seed))

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
    print(f"time both, side by side: python bench.py --ckpts={Path(config.ckpt)},{out}")


if __name__ == "__main__":
    run(main)
