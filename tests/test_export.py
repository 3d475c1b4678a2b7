"""
export.py: a checkpoint -> a transformers folder, reloaded and compared with our model.

Every model is tiny (2 layers, context 32) with large random weights, so logits
and greedy tokens depend on every weight being in the right place. The
comparisons here are the test's own (AutoModelForCausalLM and AutoTokenizer
against our forward and tiktoken), not export.verify's.
"""

import errno
import json
import os
import random
import re

import pytest
import torch

from cli import UserError
from model import GPT, PRESETS, GPTConfig, preset_config, save_checkpoint
from tokenizer import gpt2_encoding

EXTRA = "is not installed (requirements-extra.txt)"
transformers = pytest.importorskip("transformers", reason=f"transformers {EXTRA}")
pytest.importorskip("safetensors", reason=f"safetensors {EXTRA}")
pytest.importorskip("tokenizers", reason=f"tokenizers {EXTRA}")
from tools import export  # noqa: E402

# export's own promise (its verify refuses beyond it). With rotary positions the one difference is
# transformers' float32 rotary angles (test_every_preset_... shows ours are bit-identical given its
# tables): about position x 2^-24 radians of error, a few 1e-6 in logits at lively_model's scale.
TOLERANCE = 1e-5
GPT2_SHAPE = dict(norm="layernorm", pos="learned", ffn="gelu")
LLAMA_SHAPE = dict(norm="rmsnorm", pos="rope", ffn="swiglu")
QWEN3_SHAPE = dict(norm="rmsnorm", pos="rope", ffn="relu2", qk_norm=True)


def lively(config):
    """
    Weights far from the init scale (norm gains and biases too): a misplaced tensor cannot hide.
    Matrices get std 0.2 at width 32, scaled as 1 / sqrt(width) so wider models see the same activations.
    """
    model = GPT(config).eval()
    std = 0.2 * (32 / config.n_embd) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("ln_1.weight") or "ln_2" in name or "ln_f" in name else 0.0,
                      std if p.dim() == 2 else 0.1)
    return model


def lively_model(**overrides):
    shape = dict(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=32)
    return lively(GPTConfig(**{**shape, **overrides}))


def reload_and_compare(model, folder):
    """Max |logit difference| of the reloaded folder vs our model; asserts greedy generation is identical."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(model.config.vocab_size, (3, model.config.block_size))
    with torch.no_grad():
        max_diff = (model(ids)[0] - hf(ids).logits).abs().max().item()
        prompt = ids[:, :8]
        n_new = model.config.block_size - prompt.size(1)
        ours = model.generate(prompt, n_new, temperature=0)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # the comparison means something only if the output varies
    assert len(set(ours[:, 8:].flatten().tolist())) > 1
    return max_diff


@pytest.mark.parametrize("overrides, architecture", [
    (dict(GPT2_SHAPE), "GPT2LMHeadModel"),
    (dict(GPT2_SHAPE, bias=True, tie_embeddings=False, n_kv_head=2, ffn_hidden=48), "GPT2LMHeadModel"),
    (dict(LLAMA_SHAPE, n_kv_head=2), "LlamaForCausalLM"),
    (dict(LLAMA_SHAPE, bias=True, tie_embeddings=False), "LlamaForCausalLM"),
    (dict(GPT2_SHAPE, ffn="relu2"), "GPT2LMHeadModel"),
    (dict(LLAMA_SHAPE, ffn="relu2", bias=True), "LlamaForCausalLM"),  # gate = up = W, their biases too
    (dict(QWEN3_SHAPE, n_kv_head=2, tie_embeddings=False), "Qwen3ForCausalLM"),
    (dict(QWEN3_SHAPE, ffn="swiglu"), "Qwen3ForCausalLM"),
])
def test_export_reload_parity(tmp_path, overrides, architecture):
    model = lively_model(**overrides)
    name, _ = export.export(model, "bytes", tmp_path / "hf")
    assert name == architecture
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert reload_and_compare(model, tmp_path / "hf") <= TOLERANCE


def test_llama_differs_only_by_its_float32_rotary_tables(tmp_path):
    """
    transformers computes rotary angles in float32, we in float64 (then round): the one source of the small
    difference. Given transformers' cos/sin tables, our model's logits are bit-identical to the export's.
    """
    model = lively_model(**LLAMA_SHAPE, n_kv_head=2)
    export.export(model, "bytes", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(256, (2, model.config.block_size))
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(torch.zeros(1), torch.arange(model.config.block_size)[None])
        half = model.config.head_dim // 2  # transformers repeats the table for both halves
        model.rope_cos.copy_(cos[0, :, :half])
        model.rope_sin.copy_(sin[0, :, :half])
        assert torch.equal(model(ids)[0], hf(ids).logits)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_exports_and_differs_only_by_float32_rotary_tables(tmp_path, preset):
    """Each preset's shape (at a tiny width: 8 channels a head, 2 layers) exports and reloads as ours."""
    model = lively(preset_config(preset, n_embd=8 * PRESETS[preset]["n_head"], n_layer=2, block_size=32))
    name, _ = export.export(model, "bytes", tmp_path / "hf")
    assert name == ("Qwen3ForCausalLM" if model.config.qk_norm else "LlamaForCausalLM")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "To be, or not 🙂"
    assert tokenizer.encode(text, add_special_tokens=False) == list(text.encode())
    max_diff = reload_and_compare(model, tmp_path / "hf")
    print(f"{preset} as {name}: max |logit difference| {max_diff:.2e}")
    assert max_diff <= TOLERANCE
    # given transformers' own rotary tables, ours computes the exported model's logits to the bit
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(256, (2, model.config.block_size))
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(torch.zeros(1), torch.arange(model.config.block_size)[None])
        model.rope_cos.copy_(cos[0, :, :model.config.head_dim // 2])
        model.rope_sin.copy_(sin[0, :, :model.config.head_dim // 2])
        assert torch.equal(model(ids)[0], hf(ids).logits)


@pytest.mark.parametrize("shape", [GPT2_SHAPE, LLAMA_SHAPE, QWEN3_SHAPE])
def test_shared_weights_are_expanded_exactly(tmp_path, shape):
    model = lively_model(**shape, block_repeat=2, share_ffn=True)
    assert export.expansions(model.config)  # said in words to the user
    export.export(model, "bytes", tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config.get("n_layer", hf_config.get("num_hidden_layers")) == 4  # 2 blocks, each applied twice
    assert reload_and_compare(model, tmp_path / "hf") <= TOLERANCE


def test_byte_tokenizer_round_trip(tmp_path):
    export.export(lively_model(), "bytes", tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tokenizer) == 256
    # Ċ: the newline's piece (the bos_token) as text
    text = "Naïve café, 東京 🙂 <|endoftext|>\n\t\x00 end Ċ"
    assert tokenizer.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert tokenizer.decode(list(text.encode("utf-8"))) == text
    # any bytes, invalid UTF-8 included: the ids' pieces give the bytes back exactly, and decode()
    # replaces what is not UTF-8 as Python does (text in a tokenizer is a str, so invalid bytes can
    # be decoded, never encoded)
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    data = bytes(random.Random(0).randrange(256) for _ in range(500))
    pieces = tokenizer.convert_ids_to_tokens(list(data))
    assert bytes(char_to_byte[c] for piece in pieces for c in piece) == data
    assert tokenizer.decode(list(data)) == data.decode("utf-8", errors="replace")


def test_bpe_tokenizer_matches_tiktoken(tmp_path, gpt2):
    model = lively_model(vocab_size=50257)
    export.export(model, "bpe", tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "First Citizen:\n  Before we proceed... it's 1234 naïve 🙂 <|endoftext|> x\n\nĊ"
    assert tokenizer.encode(text, add_special_tokens=False) == gpt2_encoding().encode_ordinary(text)
    assert tokenizer.decode(gpt2_encoding().encode_ordinary(text)) == text


@pytest.mark.parametrize("overrides, setting", [
    (dict(embedder="pooled"), "pooled"),
    (dict(embedder="pooled", boundary="fixed"), "pooled"),
    (dict(ffn="rep_linear"), "--ffn=rep_linear"),
    (dict(ffn="linear"), "--ffn=linear"),
    (dict(GPT2_SHAPE, pos="rope"), "--pos=rope"),
    (dict(LLAMA_SHAPE, norm="layernorm"), "--norm=layernorm"),
    (dict(QWEN3_SHAPE, embedder="pooled"), "pooled"),  # named first, before the settings inside it
    (dict(GPT2_SHAPE, qk_norm=True), "--qk_norm=True"),
    (dict(QWEN3_SHAPE, bias=True), "--bias=True"),  # Qwen3 has no FFN biases
    (dict(QWEN3_SHAPE, pos="learned"), "--pos=learned"),
    (dict(QWEN3_SHAPE, ngram_buckets=31), "--ngram_buckets=0 to export"),
])
def test_refuses_what_neither_architecture_expresses(tmp_path, overrides, setting):
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, **overrides))
    with pytest.raises(UserError, match=setting):
        export.export(model, "bytes", tmp_path / "hf")
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("overrides", [
    dict(ffn="rep_linear"), dict(GPT2_SHAPE, pos="rope"), dict(LLAMA_SHAPE, norm="layernorm"),
    dict(GPT2_SHAPE, qk_norm=True), dict(QWEN3_SHAPE, bias=True), dict(QWEN3_SHAPE, pos="learned"),
    dict(QWEN3_SHAPE, ffn="gelu_linear"), dict(norm="rmsnorm", pos="learned", ffn="linear", qk_norm=True),
], ids=lambda overrides: "-".join(f"{k}={v}" for k, v in overrides.items()))
def test_a_refusal_names_flags_that_make_an_exportable_model(overrides):
    config = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, **overrides)
    with pytest.raises(UserError) as refusal:
        export.architecture(config)
    message = str(refusal.value)
    assert "\n" not in message
    # each alternative is "--key=value ... (Architecture)": applied to the config, the export takes it
    alternatives = re.findall(r"((?:--\w+=\w+ ?)+) \((\w+)\)", message)
    assert alternatives
    for flags, name in alternatives:
        changes = dict(flag[2:].split("=") for flag in flags.split())
        changes = {k: {"True": True, "False": False}.get(v, v) for k, v in changes.items()}
        assert export.architecture(GPTConfig(**{**config.__dict__, **changes})) == name


def test_an_unwritable_destination_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    model = lively_model(**QWEN3_SHAPE)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="pick another --out"):  # its parent is a file: no permission can help
        export.export(model, "bytes", tmp_path / "a_file" / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(export, "write_tokenizer", disk_full)  # the weights are written, then the disk fills
    with pytest.raises(UserError, match="disk is full.*nothing written"):
        export.export(model, "bytes", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_refuses_a_setting_it_was_not_taught(tmp_path, monkeypatch):
    """A GPTConfig key added later is refused until export.py maps it, never silently dropped."""
    monkeypatch.setattr(export, "HANDLED_KEYS", export.HANDLED_KEYS - {"block_repeat"})
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, **LLAMA_SHAPE, block_repeat=2))
    with pytest.raises(UserError, match="--block_repeat=2"):
        export.export(model, "bytes", tmp_path / "hf")


def test_failed_verification_writes_nothing_and_existing_folders_are_kept(tmp_path, monkeypatch):
    model = lively_model(**LLAMA_SHAPE)
    monkeypatch.setattr(export, "LOGIT_TOLERANCE", -1.0)  # no model can pass: the export must refuse
    with pytest.raises(UserError, match="logits differ"):
        export.export(model, "bytes", tmp_path / "hf")
    assert not any(tmp_path.iterdir())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("the user's")
    with pytest.raises(UserError, match="already exists"):
        export.export(model, "bytes", tmp_path / "hf")
    assert (tmp_path / "hf" / "mine.txt").read_text() == "the user's"


def test_command_line(tmp_path, capsys):
    """The quick start's model, at its full size, exports with the README's command."""
    model = lively(preset_config("cpu-tiny"))
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.__dict__,
                     "data_meta": {"tokenization": "bytes"}}, tmp_path / "ckpt.pt")
    export.main([f"--ckpt={tmp_path / 'ckpt.pt'}", f"--out={tmp_path / 'hf'}", "--threads=1"])
    assert "Qwen3ForCausalLM" in capsys.readouterr().out
    assert reload_and_compare(model, tmp_path / "hf") <= TOLERANCE
    pooled = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, embedder="pooled"))
    save_checkpoint({"model": pooled.state_dict(), "model_config": pooled.config.__dict__,
                     "data_meta": {"tokenization": "bytes"}}, tmp_path / "pooled.pt")
    with pytest.raises(UserError, match="pooled"):
        export.main([f"--ckpt={tmp_path / 'pooled.pt'}", f"--out={tmp_path / 'hf2'}"])
