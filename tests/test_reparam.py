"""
reparam.py: every merge against its training form, whole models against their
merged selves, the anneal schedule, and the command line on a tiny checkpoint.
"""

import dataclasses
import os

import pytest
import torch

import reparam
import train
from cli import UserError
from data import prepare
from model import GPT, GPTConfig, load_checkpoint, make_ffn, model_from_checkpoint, save_checkpoint

# float64 rounds at 1e-16 relative: two forms of the same function, on values of order 1-10 through a few
# hundred operations, agree to about 1e-13; a wrong merge is off by 1e-2 or more
F64_TOLERANCE = 1e-10
# float32 rounds at 6e-8 relative: the same sums differ by about 1e-6 of the largest logit
F32_RELATIVE_TOLERANCE = 1e-5
ANNEAL_ITERS = 3
GREEDY_TOKENS = 24


# rep_linear's and rep_parallel's merges are exercise 9 (EXERCISES.md); rep_anneal's is its worked example
MERGES = [pytest.param(ffn, marks=pytest.mark.exercise(9)) if ffn in ("rep_linear", "rep_parallel") else ffn
          for ffn in reparam.MERGEABLE]


def tiny_config(ffn, **overrides):
    settings = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, ffn=ffn, anneal_iters=ANNEAL_ITERS)
    return GPTConfig(**{**settings, **overrides})


def finish_annealing(model):
    """Put rep_anneal's schedule at its end, as training to anneal_iters does (no-op for the others)."""
    model.set_step(model.config.anneal_iters)
    return model.eval()


def trained_like(config, dtype=torch.float64):
    """A model whose every parameter, norms and branch scales included, is away from its init."""
    model = GPT(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return finish_annealing(model)


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


# ----------------------------------------------------------------------------
# one FFN: merge vs training form

@pytest.mark.parametrize("ffn", MERGES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_block_merge_matches_training_form_in_float64(ffn, bias, norm):
    model = trained_like(tiny_config(ffn, bias=bias, norm=norm))
    ffn_module = model.h[0].ffn
    merged_ffn = make_ffn(reparam.merged_config(model.config)).to(torch.float64)
    merged_ffn.load_state_dict(reparam.MERGEABLE[ffn](ffn_module))  # strict: the inference form's every tensor
    x = torch.randn(3, 5, model.config.n_embd, dtype=torch.float64)
    with torch.no_grad():
        assert (merged_ffn(x) - ffn_module(x)).abs().max().item() <= F64_TOLERANCE


# ----------------------------------------------------------------------------
# whole models

@pytest.mark.parametrize("ffn", MERGES)
@pytest.mark.parametrize("shape", [dict(), dict(share_ffn=True), dict(block_repeat=2), dict(bias=True, pos="rope")])
def test_whole_model_logits_match_in_float64(ffn, shape):
    model = trained_like(tiny_config(ffn, **shape))
    merged = reparam.reparameterize(model)
    assert merged.config.ffn == ("gelu_linear" if ffn == "rep_anneal" else "linear")
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    assert (logits(merged, idx) - logits(model, idx)).abs().max().item() <= F64_TOLERANCE


@pytest.mark.parametrize("ffn", reparam.MERGEABLE)
def test_whole_model_float32_logits_and_greedy_generation(ffn):
    model = trained_like(tiny_config(ffn), dtype=torch.float32)
    merged = reparam.reparameterize(model)
    assert next(merged.parameters()).dtype == torch.float32
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    expected = logits(model, idx)
    relative = (logits(merged, idx) - expected).abs().max() / expected.abs().max()
    assert relative.item() <= F32_RELATIVE_TOLERANCE
    prompt = idx[:1, :4]
    greedy = [m.generate(prompt, GREEDY_TOKENS, temperature=0) for m in (model, merged)]
    assert torch.equal(*greedy)


@pytest.mark.parametrize("ffn", reparam.MERGEABLE)
def test_merged_model_is_smaller_and_cheaper(ffn):
    model = trained_like(tiny_config(ffn), dtype=torch.float32)
    merged = reparam.reparameterize(model)
    assert merged.num_params()["total"] < model.num_params()["total"]
    assert reparam.forward_flops(merged, 8) < reparam.forward_flops(model, 8)


def test_merged_linear_has_the_controls_shape():
    # a merged rep_linear or rep_parallel runs exactly the computation of a directly trained `linear`
    for ffn in ("rep_linear", "rep_parallel"):
        merged = reparam.reparameterize(trained_like(tiny_config(ffn)))
        control = GPT(tiny_config("linear")).to(torch.float64)
        assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in control.state_dict().items()}


def test_merge_leaves_the_original_and_the_rng_alone():
    model = trained_like(tiny_config("rep_linear"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    reparam.reparameterize(model)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merging_twice_or_nothing_is_a_clear_error():
    merged = reparam.reparameterize(trained_like(tiny_config("rep_parallel")))
    with pytest.raises(UserError, match="nothing to merge: ffn=linear"):
        reparam.reparameterize(merged)
    for ffn in ("gelu", "swiglu", "linear", "gelu_linear"):
        with pytest.raises(UserError, match="nothing to merge"):
            reparam.reparameterize(GPT(tiny_config(ffn)))


# ----------------------------------------------------------------------------
# the anneal schedule

@pytest.mark.parametrize("shape", [dict(), dict(share_ffn=True), dict(block_repeat=3)])
def test_anneal_schedule_follows_the_step_train_py_sets_and_ends_exactly_at_one(shape):
    iters = 7
    model = GPT(tiny_config("rep_anneal", anneal_iters=iters, **shape)).train()
    idx = torch.zeros(1, 4, dtype=torch.long)
    for step in (0, 1, 6, 7, 70):
        model.set_step(step)
        model(idx)  # forward passes, however many per step, do not move the clock
        for block in model.h:
            assert block.ffn.progress().item() == min(1.0, step / iters)  # the schedule, by hand
    model.set_step(iters - 1)
    assert model.h[0].ffn.progress().item() < 1.0  # one step short: not yet mergeable


def test_training_drives_the_anneal_clock(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"abcdefgh" * 400)
    folder = prepare.prepare(prepare.PrepareConfig(input=str(text), data_dir=str(tmp_path)))
    train.main([f"--dataset={folder}", f"--out_dir={tmp_path / 'out'}", "--ffn=rep_anneal", "--anneal_iters=6",
                "--max_iters=8", "--grad_accum=2", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=8",
                "--batch_size=2", "--eval_interval=4", "--eval_tokens=64", "--threads=1"])
    checkpoint = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert checkpoint["model"]["h.0.ffn.steps_done"].item() == 8  # optimizer steps, not micro-batches
    assert reparam.reparameterize(model_from_checkpoint(checkpoint)).config.ffn == "gelu_linear"


def test_annealed_channels_are_exactly_linear_at_the_end():
    ffn = make_ffn(tiny_config("rep_anneal")).to(torch.float64)
    ffn.steps_done.fill_(ANNEAL_ITERS)
    x = torch.randn(4, 32, dtype=torch.float64)
    n_gelu = ffn.n_gelu
    # a direction that only reaches the annealed channels must pass through them linearly
    with torch.no_grad():
        ffn.c_fc.weight[:n_gelu] = 0
        assert torch.allclose(ffn(2 * x), 2 * ffn(x), rtol=0, atol=1e-12)


def test_complete_anneal_lets_an_untrained_model_merge():
    model = reparam.complete_anneal(GPT(tiny_config("rep_anneal", share_ffn=True)))
    assert model.h[0].ffn.progress().item() == 1.0
    assert reparam.reparameterize(model).config.ffn == "gelu_linear"


def test_merging_before_the_anneal_ends_is_refused():
    model = GPT(tiny_config("rep_anneal", anneal_iters=100))
    model.set_step(99)
    with pytest.raises(UserError, match="99 of 100 steps"):
        reparam.reparameterize(model.eval())


def test_anneal_schedule_survives_a_checkpoint_round_trip(tmp_path):
    model = GPT(tiny_config("rep_anneal", anneal_iters=100))
    model.set_step(37)
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, tmp_path / "c.pt")
    restored = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert restored.h[1].ffn.steps_done.item() == 37


def test_every_branch_learns():
    model = GPT(tiny_config("rep_parallel"))
    idx = torch.randint(0, 64, (2, 8))
    model(idx, idx)[1].backward()
    ffn = model.h[0].ffn
    assert all(g != 0 for g in ffn.scales.grad)  # dense, low-rank, diagonal and identity scales all get gradient


# ----------------------------------------------------------------------------
# the command line

def write_checkpoint(path, ffn, **overrides):
    model = trained_like(tiny_config(ffn, vocab_size=256, **overrides), dtype=torch.float32)
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "train_config": {"dataset": "default_bytes"}, "step": 0,
                     "data_meta": {"tokenization": "bytes", "vocab_size": 256}}, path)
    return model


@pytest.mark.parametrize("embedder", ["tokens", "pooled"])
def test_cli_merges_verifies_and_saves_a_loadable_checkpoint(tmp_path, capsys, embedder):
    path = tmp_path / "ckpt.pt"
    model = write_checkpoint(path, "rep_anneal", embedder=embedder)
    reparam.main([f"--ckpt={path}", "--verify_tokens=8", "--threads=1"])
    out = capsys.readouterr().out
    assert "max |logit difference| on random inputs" in out and "8 greedy tokens: identical" in out
    assert f"python bench.py --ckpts={path},{tmp_path / 'ckpt_merged.pt'}" in out
    merged = model_from_checkpoint(load_checkpoint(tmp_path / "ckpt_merged.pt"))
    assert merged.config.ffn == "gelu_linear"
    idx = reparam.random_inputs(model.config, 1, 16, torch.Generator())
    with torch.no_grad():
        expected, got = model(idx)[0], merged(idx)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=reparam.LOGIT_TOLERANCE)


@pytest.mark.parametrize("broken, error", [("logits", "differs from the original by"),
                                           ("generation", "greedy tokens differ")])
def test_cli_refuses_to_save_a_merge_that_computes_something_else(tmp_path, monkeypatch, broken, error):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, "rep_linear")
    merge = reparam.reparameterize

    def wrong_merge(model):
        merged = merge(model)
        if broken == "logits":
            with torch.no_grad():
                merged.h[0].ffn.c_proj.weight[0, 0] += 1e-2
        else:  # logits within tolerance, yet other greedy tokens (as a near-tie broken the other way gives)
            monkeypatch.setattr(merged, "generate", lambda idx, n, **sampling: torch.zeros(1, n, dtype=torch.long))
        return merged

    monkeypatch.setattr(reparam, "reparameterize", wrong_merge)
    with pytest.raises(UserError, match=error):
        reparam.main([f"--ckpt={path}", "--verify_tokens=8", "--threads=1"])
    assert not (tmp_path / "ckpt_merged.pt").exists()


def test_cli_refuses_a_checkpoint_with_nothing_to_merge(tmp_path):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, "gelu")
    with pytest.raises(UserError, match="nothing to merge"):
        reparam.main([f"--ckpt={path}"])
    assert not (tmp_path / "ckpt_merged.pt").exists()


def one_line_error(argv):
    """The UserError reparam.py's command line raises (cli.run prints it as one line, exit status 2)."""
    with pytest.raises(UserError) as info:
        reparam.main(argv)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("arg, message", [
    ("--verify_tokens=0", "--verify_tokens must be at least 1 (the merge is checked before it is saved), got 0"),
    ("--verify_tokens=-5", "--verify_tokens must be at least 1"),
    ("--threads=-1", "--threads must be 0 (the idle cores) up to the"),
    ("--seed=-1", "--seed must be in [0, 2**63)"),
    ("--out=CKPT", "is the checkpoint being merged"),
])
def test_cli_refuses_bad_values_before_it_writes(tmp_path, arg, message):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, "rep_linear")
    before = path.read_bytes()
    assert message in one_line_error([f"--ckpt={path}", arg.replace("CKPT", str(path))])
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_cli_says_in_one_line_that_it_cannot_write_the_merged_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, "rep_anneal")
    (tmp_path / "a_file").write_text("a file where the merged checkpoint's folder should be")
    line = one_line_error([f"--ckpt={path}", f"--out={tmp_path / 'a_file' / 'merged.pt'}",
                                   "--verify_tokens=4", "--threads=1"])
    assert f"could not write {tmp_path / 'a_file' / 'merged.pt'}" in line and "no checkpoint written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "ckpt.pt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: no refusal to see")
def test_cli_says_in_one_line_that_a_read_only_folder_cannot_take_the_merged_checkpoint(tmp_path):
    path, folder = tmp_path / "ckpt.pt", tmp_path / "read_only"
    write_checkpoint(path, "rep_linear")
    folder.mkdir()
    folder.chmod(0o500)
    try:
        line = one_line_error([f"--ckpt={path}", f"--out={folder / 'merged.pt'}", "--verify_tokens=4",
                                       "--threads=1"])
    finally:
        folder.chmod(0o700)
    assert "could not write" in line and "Permission denied" in line and not list(folder.iterdir())
