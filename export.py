"""
Export a checkpoint to a Hugging Face `transformers` folder, exactly.

    python export.py --ckpt=out/ckpt.pt --out=out/hf

The folder loads with AutoModelForCausalLM.from_pretrained and
AutoTokenizer.from_pretrained, holds the weights as safetensors, and computes
the same function as our model:
- GPT-2-shaped configs (layernorm, learned positions, GELU FFN) become a
  GPT2LMHeadModel. GPT-2 always has biases: --bias=False exports zeros, which
  adds nothing. Our tanh GELU is transformers' "gelu_pytorch_tanh" (the same
  torch call; "gelu_new" is the same formula written out, rounding differently).
  Grouped-query attention is exported by repeating each key/value head for the
  query heads that read it: exact, as that is what attention does with it.
- Llama-shaped configs (rmsnorm, rope, SwiGLU, any biases) become a
  LlamaForCausalLM. Our rotary positions rotate (first half, second half)
  channel pairs, as Llama's rotate_half does, so no permutation is needed; the
  fused c_attn splits into q, k, v and the fused SwiGLU c_fc into gate, up.
- Weight sharing is expanded, which is exact: --block_repeat=k writes each block
  k times in a row, --share_ffn writes the shared FFN into every layer. The
  exported model has more stored parameters than ours, and the same function.
- Anything else is refused with one line naming the setting: pooled models
  (a byte encoder and decoder neither architecture has), the linear and
  reparameterized FFNs (merged or not: a d x d path or a GELU beside a linear
  path), mixed shapes (e.g. rope with layernorm), and any config key this file
  does not know about (it refuses rather than guessing).

The tokenizer reproduces the model's tokenization: GPT-2's BPE (built from
tiktoken's ranks, with "<|endoftext|>" in text split like any text, as the
training data was), a 256-symbol byte tokenizer (each id is one byte; text in,
UTF-8 bytes out; decoding ids that are not valid UTF-8 gives U+FFFD as Python's
errors="replace" does), or a copy of the teacher's tokenizer for hf: data.

The export verifies itself before it lands: the reloaded model's logits equal
ours to 1e-5 (max abs difference) on a full context of random tokens, greedy
generation is identical, and the reloaded tokenizer encodes a sample text as
ours does. Otherwise it refuses. It is written to a temporary folder beside
--out and renamed into place, so nothing the user had is touched.
"""

import base64
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import reparam
from cli import UserError, parse_config, run
from model import GPTConfig, load_checkpoint, model_from_checkpoint
from tokenizer import HF_PREFIX, encode, gpt2_encoding, load_hf_tokenizer

LOGIT_TOLERANCE = 1e-5  # max |logit difference| between the exported model and ours
GENERATE_TOKENS = 32  # greedy tokens compared (fewer when the context is shorter)
SAMPLE_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak. Naïve café, 東京 🙂 <|endoftext|>\n"
NEWLINE = "\n"  # the exported tokenizer's bos_token (see write_tokenizer)
PARTIAL_SUFFIX = ".partial"  # out/hf is written as out/hf.partial, then renamed
EXTRAS = "pip install -r requirements-extra.txt"


@dataclass
class ExportConfig:
    ckpt: str = "out/ckpt.pt"
    out: str = "out/hf"  # the folder to write; it must not exist yet
    seed: int = 1337  # picks the random tokens the logits are compared on
    threads: int = 0  # CPU threads for torch; 0 = every core


def require(module, package=None):
    """Import an optional extra, or raise a one-line error naming the pip command."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed: {EXTRAS} (or pip install {package or module})") from None


# ----------------------------------------------------------------------------
# what each architecture can express

GPT2_SHAPE = {"norm": "layernorm", "pos": "learned", "ffn": "gelu"}
LLAMA_SHAPE = {"norm": "rmsnorm", "pos": "rope", "ffn": "swiglu"}
# the keys the mappings below handle; a key added to GPTConfig later must be taught here before it exports
HANDLED_KEYS = {"block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn", "ffn_hidden", "norm",
                "pos", "rope_theta", "bias", "dropout", "tie_embeddings", "block_repeat", "share_ffn", "embedder",
                # settings of modules an exportable model does not have
                "anneal_fraction", "anneal_iters", "boundary", "max_chunk_bytes", "fixed_chunk_bytes", "byte_width",
                "byte_heads", "byte_layers_in", "byte_layers_out", "byte_window", "ffn_merged", "ffn_norm_folded"}


def architecture(config):
    """'gpt2' or 'llama' for a config one of them expresses exactly; a one-line UserError naming the setting if not."""
    unknown = [f.name for f in dataclasses.fields(config)
               if f.name not in HANDLED_KEYS and getattr(config, f.name) != f.default]
    if unknown:
        raise UserError(f"--{unknown[0]}={getattr(config, unknown[0])} is not something export.py can map to "
                        "GPT-2 or Llama yet: refusing rather than guessing")
    if config.embedder == "pooled":
        raise UserError("a pooled model (--embedder=pooled: byte layers around a per-chunk core) has no GPT-2 or Llama "
                        "equivalent; evaluate it with evaluation.py instead")
    if config.ffn in reparam.FFN_TYPES:
        raise UserError(f"--ffn={config.ffn} (merged or not) has a linear path neither GPT-2 nor Llama has: "
                        "only gelu and swiglu FFNs export")
    for name, title, shape in (("gpt2", "GPT-2", GPT2_SHAPE), ("llama", "Llama", LLAMA_SHAPE)):
        if config.ffn == shape["ffn"]:  # the FFN picks the family; the rest of the shape must follow it
            mismatch = [key for key in shape if getattr(config, key) != shape[key]]
            if mismatch:
                key = mismatch[0]
                raise UserError(f"--{key}={getattr(config, key)} with --ffn={config.ffn}: {title} needs "
                                f"--{key}={shape[key]}, so this mixed shape cannot be exported")
            return name
    raise AssertionError(f"unhandled ffn {config.ffn}")


def expanded_layers(model):
    """Our blocks in the order the exported layers run them: each repeated block_repeat times in a row."""
    return [block for block in model.h for _ in range(model.config.block_repeat)]


def expansions(config):
    """What the export expands, said in words (empty when nothing is)."""
    notes = []
    if config.block_repeat > 1:
        notes.append(f"--block_repeat={config.block_repeat}: {config.n_layer} blocks written as "
                     f"{config.n_layer * config.block_repeat} layers")
    if config.share_ffn:
        notes.append("--share_ffn: the shared FFN written into every layer")
    if config.kv_heads != config.n_head and architecture(config) == "gpt2":
        notes.append(f"--n_kv_head={config.kv_heads}: key/value heads repeated to {config.n_head} for GPT-2")
    return notes


# ----------------------------------------------------------------------------
# weights: our state -> transformers' names and layouts

def split_qkv(attn, config):
    """The fused c_attn's weight (and bias) split into q, k, v rows."""
    sizes = [config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim]
    weights = attn.c_attn.weight.split(sizes, dim=0)
    biases = attn.c_attn.bias.split(sizes, dim=0) if attn.c_attn.bias is not None else (None, None, None)
    return weights, biases


def repeat_kv(tensor, config):
    """(kv_heads * head_dim, ...) -> (n_head * head_dim, ...): each key/value head once per query head reading it."""
    group = config.n_head // config.kv_heads
    heads = tensor.view(config.kv_heads, config.head_dim, *tensor.shape[1:])
    return heads.repeat_interleave(group, dim=0).reshape(config.n_head * config.head_dim, *tensor.shape[1:])


def or_zeros(bias, size):
    """GPT-2 always has biases: a model trained without them exports zeros, which add nothing."""
    return bias if bias is not None else torch.zeros(size)


def gpt2_weights(model):
    """(GPT2Config keyword arguments, state dict) for a GPT-2-shaped model."""
    config = model.config
    C = config.n_embd
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": or_zeros(model.ln_f.bias, C)}
    for i, block in enumerate(expanded_layers(model)):
        prefix = f"transformer.h.{i}."
        (q, k, v), (qb, kb, vb) = split_qkv(block.attn, config)
        qb, kb, vb = (or_zeros(b, w.size(0)) for b, w in zip((qb, kb, vb), (q, k, v)))
        k, v, kb, vb = (repeat_kv(t, config) for t in (k, v, kb, vb))
        # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's weight
        state.update({
            prefix + "ln_1.weight": block.ln_1.weight, prefix + "ln_1.bias": or_zeros(block.ln_1.bias, C),
            prefix + "attn.c_attn.weight": torch.cat([q, k, v]).t(),
            prefix + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
            prefix + "attn.c_proj.weight": block.attn.c_proj.weight.t(),
            prefix + "attn.c_proj.bias": or_zeros(block.attn.c_proj.bias, C),
            prefix + "ln_2.weight": block.ln_2.weight, prefix + "ln_2.bias": or_zeros(block.ln_2.bias, C),
            prefix + "mlp.c_fc.weight": block.mlp.c_fc.weight.t(),
            prefix + "mlp.c_fc.bias": or_zeros(block.mlp.c_fc.bias, config.hidden_dim),
            prefix + "mlp.c_proj.weight": block.mlp.c_proj.weight.t(),
            prefix + "mlp.c_proj.bias": or_zeros(block.mlp.c_proj.bias, C),
        })
    if not config.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    hf_config = dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=config.vocab_size,
        n_positions=config.block_size, n_embd=C, n_layer=config.n_layer * config.block_repeat, n_head=config.n_head,
        n_inner=config.hidden_dim, activation_function="gelu_pytorch_tanh", layer_norm_epsilon=model.ln_f.eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=config.tie_embeddings,
        scale_attn_weights=True, bos_token_id=None, eos_token_id=None)
    return hf_config, state


def llama_weights(model):
    """(LlamaConfig keyword arguments, state dict) for a Llama-shaped model."""
    config = model.config
    state = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    for i, block in enumerate(expanded_layers(model)):
        prefix = f"model.layers.{i}."
        (q, k, v), (qb, kb, vb) = split_qkv(block.attn, config)
        gate, up = block.mlp.c_fc.weight.chunk(2, dim=0)  # SwiGLU.forward chunks c_fc's output as (gate, up)
        state.update({
            prefix + "input_layernorm.weight": block.ln_1.weight,
            prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.o_proj.weight": block.attn.c_proj.weight,
            prefix + "post_attention_layernorm.weight": block.ln_2.weight,
            prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": block.mlp.c_proj.weight,
        })
        if config.bias:
            gate_bias, up_bias = block.mlp.c_fc.bias.chunk(2, dim=0)
            state.update({
                prefix + "self_attn.q_proj.bias": qb, prefix + "self_attn.k_proj.bias": kb,
                prefix + "self_attn.v_proj.bias": vb, prefix + "self_attn.o_proj.bias": block.attn.c_proj.bias,
                prefix + "mlp.gate_proj.bias": gate_bias, prefix + "mlp.up_proj.bias": up_bias,
                prefix + "mlp.down_proj.bias": block.mlp.c_proj.bias,
            })
    if not config.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    hf_config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=config.vocab_size,
        hidden_size=config.n_embd, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layer * config.block_repeat, num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.block_size, rms_norm_eps=model.ln_f.eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.bias, mlp_bias=config.bias, attention_dropout=0.0,
        tie_word_embeddings=config.tie_embeddings, bos_token_id=None, eos_token_id=None)
    return hf_config, state


def write_weights(model, folder):
    """config.json and model.safetensors for our model in folder; returns the architecture's name."""
    safetensors_torch = require("safetensors.torch", "safetensors")
    name = architecture(model.config)
    hf_config, state = (gpt2_weights if name == "gpt2" else llama_weights)(model)
    hf_config["torch_dtype"] = str(model.ln_f.weight.dtype).removeprefix("torch.")
    # safetensors refuses tensors that share memory (tied, expanded): every entry gets its own contiguous copy
    state = {key: tensor.detach().contiguous().clone() for key, tensor in state.items()}
    safetensors_torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return hf_config["architectures"][0]


# ----------------------------------------------------------------------------
# the tokenizer

def hf_bytes_tokenizer():
    """A tokenizers.Tokenizer whose id i is the byte i: GPT-2's byte-level mapping with no merges."""
    tokenizers = require("tokenizers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # byte -> printable character, as GPT-2's BPE
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    # no regex split and no prefix space: every byte of the text becomes its own token, in order
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


def hf_gpt2_tokenizer(folder):
    """GPT-2's BPE as a tokenizers.Tokenizer, converted from tiktoken's ranks (no download beyond tiktoken's)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    encoding = gpt2_encoding()
    ranks = folder / "gpt2.tiktoken"  # tiktoken's file format: base64 token, rank; read back by the converter
    ranks.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                             for token, rank in encoding._mergeable_ranks.items()))
    tokenizer = TikTokenConverter(vocab_file=str(ranks), pattern=encoding._pat_str,
                                  extra_special_tokens=encoding._special_tokens).converted()
    ranks.unlink()
    return tokenizer


def write_tokenizer(tokenization, folder):
    """The tokenizer files AutoTokenizer reads, reproducing data/prepare.py's tokenization."""
    transformers = require("transformers")
    if tokenization.startswith(HF_PREFIX):
        load_hf_tokenizer(tokenization[len(HF_PREFIX):]).save_pretrained(folder)
        return
    if tokenization not in ("bytes", "bpe"):
        raise UserError(f"tokenization {tokenization!r} has no exported tokenizer")
    tokenizer = hf_bytes_tokenizer() if tokenization == "bytes" else hf_gpt2_tokenizer(folder)
    special = {"eos_token": "<|endoftext|>"} if tokenization == "bpe" else {}
    # bos_token is the newline's piece: evaluation.py scores a text with no context after a newline, and so does
    # lm-eval's hf model when it prefixes bos. split_special_tokens: special tokens' text in a string is
    # tokenized like any text (a literal "<|endoftext|>" too, as tiktoken's encode_ordinary has it)
    newline = tokenizer.id_to_token(tokenizer.encode(NEWLINE, add_special_tokens=False).ids[0])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=newline,
                                                     split_special_tokens=True, **special)
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------
# verification

@torch.no_grad()
def verify(model, folder, tokenization, seed=0):
    """
    Reload folder with transformers and compare with our model; returns the max
    |logit difference|. Raises a UserError if logits, greedy tokens or the
    tokenizer differ.
    """
    transformers = require("transformers")
    config = model.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=model.ln_f.weight.dtype).eval()
    # logits at every position of a full context: rotary angles and learned positions are all exercised
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(config.vocab_size, (2, config.block_size), generator=generator)
    ours, _ = model(ids)
    theirs = hf(ids).logits
    max_diff = (ours - theirs).abs().max().item()
    if max_diff > LOGIT_TOLERANCE:
        raise UserError(f"the exported model's logits differ from ours by {max_diff:.2e} (> {LOGIT_TOLERANCE:.0e}): "
                        "not exported")
    # greedy generation within one context (beyond it our window slides and GPT-2's positions run out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = encode(tokenization, SAMPLE_TEXT)
    if tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False) != prompt:
        raise UserError("the exported tokenizer does not reproduce the model's tokenization: not exported")
    prompt = torch.tensor([prompt[:config.block_size // 2]])
    n_new = min(GENERATE_TOKENS, config.block_size - prompt.size(1))
    ours = model.generate(prompt, n_new, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, pad_token_id=0)
    if not torch.equal(ours, theirs):
        raise UserError("greedy generation of the exported model differs from ours: not exported")
    return max_diff


def export(model, tokenization, out, seed=0):
    """
    Write model and tokenizer to out (which must not exist), verified; returns
    (architecture, max |logit difference|). On any failure out is not created.
    """
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: pass another --out, or remove it first")
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if partial.exists():
        raise UserError(f"{partial} exists (an interrupted export?): remove it first")
    architecture(model.config)  # refuse before writing anything
    partial.mkdir(parents=True)
    try:
        name = write_weights(model, partial)
        write_tokenizer(tokenization, partial)
        max_diff = verify(model, partial, tokenization, seed)
    except BaseException:
        shutil.rmtree(partial)  # ours alone: created above
        raise
    partial.rename(out)
    return name, max_diff


def main(argv=None):
    config = ExportConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    torch.set_num_threads(config.threads or torch.get_num_threads())
    checkpoint = load_checkpoint(config.ckpt)
    model_config = GPTConfig(**checkpoint["model_config"])
    architecture(model_config)  # a one-line refusal before anything is loaded or written
    model = model_from_checkpoint(checkpoint)
    tokenization = checkpoint["data_meta"]["tokenization"]
    for note in expansions(model_config):
        print(f"expanding {note}")
    t0 = time.perf_counter()
    name, max_diff = export(model, tokenization, config.out, config.seed)
    print(f"wrote {config.out} ({name}, {tokenization} tokenizer) in {time.perf_counter() - t0:.1f} s; "
          f"verified: max |logit difference| {max_diff:.2e} <= {LOGIT_TOLERANCE:.0e}, greedy generation identical")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(config.out)!r}); "
          f"evaluate it: lm_eval --model hf --model_args pretrained={config.out} --tasks=...")


if __name__ == "__main__":
    run(main)
