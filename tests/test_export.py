"""
export.py: a checkpoint -> a transformers folder, reloaded and compared with our model.

Every model is tiny (2 layers, width 32, context 32) with large random weights,
so logits and greedy tokens depend on every weight being in the right place.
The comparisons here are the test's own (AutoModelForCausalLM and
AutoTokenizer against our forward and tiktoken), not export.verify's.
"""

import json
import random

import pytest
import torch

from cli import UserError
from model import GPT, GPTConfig, save_checkpoint
from tokenizer import gpt2_encoding

transformers = pytest.importorskip("transformers", reason="transformers is not installed (requirements-extra.txt)")
pytest.importorskip("safetensors", reason="safetensors is not installed (requirements-extra.txt)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (requirements-extra.txt)")
import export  # noqa: E402

TOLERANCE = 1e-5
GPT2_SHAPE = dict(norm="layernorm", pos="learned", ffn="gelu")
LLAMA_SHAPE = dict(norm="rmsnorm", pos="rope", ffn="swiglu")


def lively_model(**overrides):
    """Weights far from the init scale (norm gains and biases too): a misplaced tensor cannot hide."""
    config = GPTConfig(**{**dict(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=32), **overrides})
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("ln_1.weight") or "ln_2" in name or "ln_f" in name else 0.0,
                      0.2 if p.dim() == 2 else 0.1)
    return model


def reload_and_compare(model, folder):
    """Max |logit difference| of the reloaded folder vs our model; asserts greedy generation is identical."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(model.config.vocab_size, (3, model.config.block_size))
    with torch.no_grad():
        max_diff = (model(ids)[0] - hf(ids).logits).abs().max().item()
        prompt = ids[:, :8]
        n_new = model.config.block_size - prompt.size(1)
        ours = model.generate(prompt, n_new, temperature=0)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n_new,
                             min_new_tokens=n_new, pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert len(set(ours[:, 8:].flatten().tolist())) > 1  # the comparison means something only if the output varies
    return max_diff


@pytest.mark.parametrize("overrides, architecture", [
    (dict(GPT2_SHAPE), "GPT2LMHeadModel"),
    (dict(GPT2_SHAPE, bias=True, tie_embeddings=False, n_kv_head=2, ffn_hidden=48), "GPT2LMHeadModel"),
    (dict(LLAMA_SHAPE, n_kv_head=2), "LlamaForCausalLM"),
    (dict(LLAMA_SHAPE, bias=True, tie_embeddings=False, rope_theta=500.0), "LlamaForCausalLM"),
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


@pytest.mark.parametrize("shape", [GPT2_SHAPE, LLAMA_SHAPE])
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
    text = "Naïve café, 東京 🙂 <|endoftext|>\n\t\x00 end Ċ"  # Ċ: the newline's piece (the bos_token) as text
    assert tokenizer.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert tokenizer.decode(list(text.encode("utf-8"))) == text
    # any bytes, invalid UTF-8 included: the ids' pieces give the bytes back exactly, and decode() replaces what
    # is not UTF-8 as Python does (text in a tokenizer is a str, so invalid bytes can be decoded, never encoded)
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
])
def test_refuses_what_neither_architecture_expresses(tmp_path, overrides, setting):
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, **overrides))
    with pytest.raises(UserError, match=setting):
        export.export(model, "bytes", tmp_path / "hf")
    assert not any(tmp_path.iterdir())  # nothing written


def test_refuses_a_setting_it_was_not_taught(tmp_path, monkeypatch):
    """A GPTConfig key added later (QK-norm, say) is refused until export.py maps it, never silently dropped."""
    monkeypatch.setattr(export, "HANDLED_KEYS", export.HANDLED_KEYS - {"rope_theta"})
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, **LLAMA_SHAPE, rope_theta=500.0))
    with pytest.raises(UserError, match="--rope_theta=500.0"):
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
    model = lively_model()
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.__dict__,
                     "data_meta": {"tokenization": "bytes"}}, tmp_path / "ckpt.pt")
    export.main([f"--ckpt={tmp_path / 'ckpt.pt'}", f"--out={tmp_path / 'hf'}", "--threads=1"])
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert reload_and_compare(model, tmp_path / "hf") <= TOLERANCE
    pooled = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, embedder="pooled"))
    save_checkpoint({"model": pooled.state_dict(), "model_config": pooled.config.__dict__,
                     "data_meta": {"tokenization": "bytes"}}, tmp_path / "pooled.pt")
    with pytest.raises(UserError, match="pooled"):
        export.main([f"--ckpt={tmp_path / 'pooled.pt'}", f"--out={tmp_path / 'hf2'}"])
