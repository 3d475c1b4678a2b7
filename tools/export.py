"""
Export a checkpoint to a Hugging Face `transformers` folder that computes the same function.

    python tools/export.py --ckpt=out/ckpt.pt --out=out/hf

The folder loads with AutoModelForCausalLM and AutoTokenizer, so transformers, lm-eval's `hf`
model and the tools built on them run our models without this project's code. Each shape goes
to the transformers architecture that computes exactly what ours does (GPT-2, Llama or Qwen3);
any other is refused in one line that names the flags which would make it exportable. The export
checks itself (logits, greedy tokens, tokenizer) before the folder appears.
"""

import base64
import dataclasses
import errno
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# run from anywhere: the project's modules are one folder up
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import UserError, parse_config, require, run, set_threads
from model import NORM_EPS, ROPE_THETA, GPTConfig, load_checkpoint, model_from_checkpoint
from tokenizer import HF_PREFIX, encode, gpt2_encoding, load_hf_tokenizer

LOGIT_TOLERANCE = 1e-5  # max |logit difference| between the exported model and ours


@dataclass
class ExportConfig:
    ckpt: str = "out/ckpt.pt"
    out: str = "out/hf"  # the folder to write; it must not exist yet
    threads: int = 0  # CPU threads for torch; 0 = the cores idle at the start


# ----------------------------------------------------------------------------
# which transformers architecture computes our function exactly

# The settings each architecture expresses exactly (a refusal suggests the first value of each):
# - GPT-2: LayerNorm, learned positions, an ungated FFN; its activation_function has our tanh
#   GELU ("gelu_pytorch_tanh", the same torch call) and ReLU squared ("relu2").
# - Llama: RMSNorm, rotary positions, a gated FFN act(x W_gate) * (x W_up). SwiGLU is that with
#   silu; ReLU squared is that with relu and W_gate = W_up = W, as relu(a) * a = relu(a)^2.
# - Qwen3: Llama's shape with queries and keys RMS-normed per head before the rotation, as our
#   QK-norm does (its norms' weights are ones); it has no FFN biases.
ARCHITECTURES = {
    "GPT2LMHeadModel": dict(norm=("layernorm",), pos=("learned",), ffn=("gelu", "relu2"),
                            qk_norm=(False,)),
    "LlamaForCausalLM": dict(norm=("rmsnorm",), pos=("rope",), ffn=("swiglu", "relu2"),
                             qk_norm=(False,)),
    "Qwen3ForCausalLM": dict(norm=("rmsnorm",), pos=("rope",), ffn=("relu2", "swiglu"),
                             qk_norm=(True,), bias=(False,)),
}
# the GPTConfig keys the mappings below handle: a key added later is refused until taught here
HANDLED_KEYS = {"block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn",
                "ffn_hidden", "norm", "pos", "bias", "dropout", "qk_norm", "tie_embeddings",
                "block_repeat", "share_ffn", "embedder",
                # settings of modules an exportable model does not have
                "anneal_iters", "boundary", "byte_width", "byte_window", "ngram_buckets"}


def architecture(config):
    """The transformers class that computes config's model exactly; if none, a one-line UserError."""
    if config.embedder == "pooled":
        raise UserError("a pooled model (--embedder=pooled) has byte layers no transformers "
                        "architecture has: only --embedder=tokens models export "
                        "(score this one with tools/evaluation.py)")
    if config.ngram_buckets:
        raise UserError(f"--ngram_buckets={config.ngram_buckets}: hashed n-gram tables are in no transformers "
                        "architecture: train with --ngram_buckets=0 to export")
    unknown = [f.name for f in dataclasses.fields(config)
               if f.name not in HANDLED_KEYS and getattr(config, f.name) != f.default]
    if unknown:
        raise UserError(f"--{unknown[0]}={getattr(config, unknown[0])} is not something export.py "
                        "can map yet: refusing rather than guessing")
    # the flags each architecture would need changed: none for the one that fits
    changes = {name: [f"--{key}={allowed[0]}" for key, allowed in needs.items()
                      if getattr(config, key) not in allowed]
               for name, needs in ARCHITECTURES.items()}
    for name, change in changes.items():
        if not change:
            return name
    # refused: the shape, and the smallest changes that would make it exportable
    fewest = min(len(change) for change in changes.values())
    fixes = " or ".join(f"{' '.join(change)} ({name})" for name, change in changes.items()
                        if len(change) == fewest)
    shape = " ".join(f"--{key}={getattr(config, key)}"
                     for key in ("norm", "pos", "ffn", "qk_norm", "bias"))
    raise UserError(f"a model with {shape} has no exact transformers form: "
                    f"one trained with {fixes} exports")


def expanded_layers(model):
    """Our blocks in the order the exported layers run them: each block_repeat times in a row."""
    return [block for block in model.h for _ in range(model.config.block_repeat)]


def expansions(config):
    """What the export expands, said in words (empty when nothing is)."""
    notes = []
    if config.block_repeat > 1:
        notes.append(f"--block_repeat={config.block_repeat}: {config.n_layer} blocks written as "
                     f"{config.n_layer * config.block_repeat} layers")
    if config.share_ffn:
        notes.append("--share_ffn: the shared FFN written into every layer")
    if config.kv_heads != config.n_head and architecture(config) == "GPT2LMHeadModel":
        notes.append(f"--n_kv_head={config.kv_heads}: key/value heads repeated to {config.n_head} "
                     "for GPT-2")
    return notes


# ----------------------------------------------------------------------------
# weights: our state -> transformers' names and layouts
# Weight sharing is expanded, which is exact: a shared tensor is written into every layer using it.

def split_qkv(attn, config):
    """The fused c_attn's weight (and bias) split into q, k, v rows."""
    kv_width = config.kv_heads * config.head_dim
    sizes = [config.n_head * config.head_dim, kv_width, kv_width]
    weights = attn.c_attn.weight.split(sizes, dim=0)
    biases = (None, None, None) if attn.c_attn.bias is None else attn.c_attn.bias.split(sizes, dim=0)
    return weights, biases


def repeat_kv(tensor, config):
    """(kv_heads * head_dim, ...) -> (n_head * head_dim, ...): each head once per query head."""
    group = config.n_head // config.kv_heads
    rest = tensor.shape[1:]
    heads = tensor.view(config.kv_heads, config.head_dim, *rest)
    return heads.repeat_interleave(group, dim=0).reshape(config.n_head * config.head_dim, *rest)


def or_zeros(bias, size):
    """GPT-2 always has biases: a model trained without them exports zeros, which add nothing."""
    return bias if bias is not None else torch.zeros(size)


def gpt2_weights(model):
    """(GPT2Config keyword arguments, state dict) for a GPT-2-shaped model."""
    config = model.config
    C = config.n_embd
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight,
             "transformer.ln_f.bias": or_zeros(model.ln_f.bias, C)}
    for i, block in enumerate(expanded_layers(model)):
        prefix = f"transformer.h.{i}."
        (q, k, v), (qb, kb, vb) = split_qkv(block.attn, config)
        qb, kb, vb = (or_zeros(b, w.size(0)) for b, w in zip((qb, kb, vb), (q, k, v)))
        # GPT-2 has no grouped-query attention: each key/value head is repeated for the query
        # heads reading it, which is exactly what attention does with it
        k, v, kb, vb = (repeat_kv(t, config) for t in (k, v, kb, vb))
        # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's weight
        state.update({
            prefix + "ln_1.weight": block.ln_1.weight,
            prefix + "ln_1.bias": or_zeros(block.ln_1.bias, C),
            prefix + "attn.c_attn.weight": torch.cat([q, k, v]).t(),
            prefix + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
            prefix + "attn.c_proj.weight": block.attn.c_proj.weight.t(),
            prefix + "attn.c_proj.bias": or_zeros(block.attn.c_proj.bias, C),
            prefix + "ln_2.weight": block.ln_2.weight,
            prefix + "ln_2.bias": or_zeros(block.ln_2.bias, C),
            prefix + "mlp.c_fc.weight": block.ffn.c_fc.weight.t(),
            prefix + "mlp.c_fc.bias": or_zeros(block.ffn.c_fc.bias, config.hidden_dim),
            prefix + "mlp.c_proj.weight": block.ffn.c_proj.weight.t(),
            prefix + "mlp.c_proj.bias": or_zeros(block.ffn.c_proj.bias, C),
        })
    hf_config = dict(
        model_type="gpt2", n_positions=config.block_size, n_embd=C, n_head=config.n_head,
        n_layer=config.n_layer * config.block_repeat, n_inner=config.hidden_dim,
        layer_norm_epsilon=NORM_EPS,
        activation_function="relu2" if config.ffn == "relu2" else "gelu_pytorch_tanh",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True)
    return hf_config, state


def gated_ffn(ffn, config):
    """((gate, up) weights, (gate, up) biases) of the gated FFN that computes ours."""
    if config.ffn == "swiglu":
        # SwiGLU.forward chunks c_fc's output as (gate, up)
        weights = ffn.c_fc.weight.chunk(2, dim=0)
        biases = ffn.c_fc.bias.chunk(2, dim=0) if config.bias else (None, None)
        return weights, biases
    # ReLU squared: relu(a) * a is relu(a)^2 to the bit (x * x for a > 0, a zero otherwise)
    return (ffn.c_fc.weight, ffn.c_fc.weight), (ffn.c_fc.bias, ffn.c_fc.bias)


def rotary_weights(model, name):
    """(LlamaConfig or Qwen3Config keyword arguments, state dict) for a model of that shape."""
    config = model.config
    state = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    for i, block in enumerate(expanded_layers(model)):
        prefix = f"model.layers.{i}."
        (q, k, v), (qb, kb, vb) = split_qkv(block.attn, config)
        (gate, up), (gate_bias, up_bias) = gated_ffn(block.ffn, config)
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        state.update({
            prefix + "input_layernorm.weight": block.ln_1.weight,
            attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v,
            attn + "o_proj.weight": block.attn.c_proj.weight,
            prefix + "post_attention_layernorm.weight": block.ln_2.weight,
            mlp + "gate_proj.weight": gate, mlp + "up_proj.weight": up,
            mlp + "down_proj.weight": block.ffn.c_proj.weight,
        })
        if config.qk_norm:
            # our QK-norm has no weight: Qwen3's q_norm and k_norm are ones, which multiply exactly
            ones = torch.ones(config.head_dim)
            state.update({attn + "q_norm.weight": ones, attn + "k_norm.weight": ones})
        if config.bias:
            state.update({
                attn + "q_proj.bias": qb, attn + "k_proj.bias": kb, attn + "v_proj.bias": vb,
                attn + "o_proj.bias": block.attn.c_proj.bias,
                mlp + "gate_proj.bias": gate_bias, mlp + "up_proj.bias": up_bias,
                mlp + "down_proj.bias": block.ffn.c_proj.bias,
            })
    # Our rotary positions rotate (first half, second half) channel pairs, as transformers'
    # rotate_half does, so q and k need no permutation. One eps serves every norm, ours and
    # theirs, QK-norm included.
    hf_config = dict(
        hidden_size=config.n_embd, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layer * config.block_repeat, num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
        hidden_act="silu" if config.ffn == "swiglu" else "relu",
        max_position_embeddings=config.block_size, rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_bias=config.bias, attention_dropout=0.0)
    if name == "LlamaForCausalLM":
        hf_config.update(model_type="llama", mlp_bias=config.bias)
    else:
        hf_config.update(model_type="qwen3", use_sliding_window=False, sliding_window=None)
    return hf_config, state


def write_weights(model, name, folder):
    """config.json and model.safetensors for our model as the transformers class `name`, in folder."""
    safetensors_torch = require("safetensors.torch", "safetensors")
    config = model.config
    if name == "GPT2LMHeadModel":
        hf_config, state = gpt2_weights(model)
    else:
        hf_config, state = rotary_weights(model, name)
    if not config.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    hf_config.update(architectures=[name], vocab_size=config.vocab_size,
                     tie_word_embeddings=config.tie_embeddings, bos_token_id=None, eos_token_id=None,
                     dtype=str(model.ln_f.weight.dtype).removeprefix("torch."))
    # safetensors refuses tensors that share memory (tied, expanded): each gets its own copy.
    # Serialized in memory and written by Python, a failed write is an OSError like any other.
    state = {key: tensor.detach().contiguous().clone() for key, tensor in state.items()}
    weights = safetensors_torch.save(state, metadata={"format": "pt"})
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


# ----------------------------------------------------------------------------
# the tokenizer: the model's own tokenization, as data/prepare.py applied it

def hf_bytes_tokenizer():
    """A tokenizers.Tokenizer whose id i is the byte i: GPT-2's byte-level mapping, no merges."""
    tokenizers = require("tokenizers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    # each byte is written as a printable character, as in GPT-2's BPE
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    # no regex split and no prefix space: every byte of the text becomes its own token, in order;
    # decoding ids that are not UTF-8 gives U+FFFD, as Python's errors="replace" does
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                  use_regex=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


def hf_gpt2_tokenizer(folder):
    """GPT-2's BPE as a tokenizers.Tokenizer, converted from tiktoken's ranks (no other download)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    encoding = gpt2_encoding()
    # tiktoken's file format, one "base64 token, rank" a line, read back by the converter
    ranks = folder / "gpt2.tiktoken"
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
        # hf: data was tokenized by a teacher's tokenizer: a copy of it
        load_hf_tokenizer(tokenization[len(HF_PREFIX):]).save_pretrained(folder)
        return
    if tokenization not in ("bytes", "bpe"):
        raise UserError(f"tokenization {tokenization!r} has no exported tokenizer")
    tokenizer = hf_bytes_tokenizer() if tokenization == "bytes" else hf_gpt2_tokenizer(folder)
    special = {"eos_token": "<|endoftext|>"} if tokenization == "bpe" else {}
    # bos_token is the newline's piece: evaluation.py scores a text with no context after a
    # newline, and so does lm-eval's hf model when it prefixes bos. split_special_tokens: special
    # tokens' text is tokenized like any text (as tiktoken's encode_ordinary has it)
    newline = tokenizer.id_to_token(tokenizer.encode("\n", add_special_tokens=False).ids[0])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=newline,
                                                     split_special_tokens=True, **special)
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------
# verification: the reloaded folder against our model

@torch.no_grad()
def verify(model, folder, tokenization):
    """
    Reload folder with transformers and compare with our model; returns the max
    |logit difference|. Raises a UserError if logits, greedy tokens or the
    tokenizer differ.
    """
    transformers = require("transformers")
    config = model.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=model.ln_f.weight.dtype)
    hf.eval()
    # logits at every position of a full context: every rotary angle and learned position
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(config.vocab_size, (2, config.block_size), generator=generator)
    max_diff = (model(ids)[0] - hf(ids).logits).abs().max().item()
    if max_diff > LOGIT_TOLERANCE:
        raise UserError(f"the exported model's logits differ from ours by {max_diff:.2e} "
                        f"(> {LOGIT_TOLERANCE:.0e}): not exported")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = "First Citizen:\nBefore we proceed, hear me speak. Naïve café, 東京 🙂 <|endoftext|>\n"
    prompt = encode(tokenization, text)
    if tokenizer.encode(text, add_special_tokens=False) != prompt:
        raise UserError("the exported tokenizer does not reproduce the model's tokenization: "
                        "not exported")
    # greedy generation within one context (beyond it our window slides, GPT-2's positions run out)
    prompt = torch.tensor([prompt[:config.block_size // 2]])
    n_new = min(32, config.block_size - prompt.size(1))
    ours = model.generate(prompt, n_new, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                         min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    if not torch.equal(ours, theirs):
        raise UserError("greedy generation of the exported model differs from ours: not exported")
    return max_diff


def export(model, tokenization, out):
    """
    Write model and tokenizer to out (which must not exist), verified; returns
    (architecture, max |logit difference|). On any failure out is not created.
    """
    out = Path(out)
    name = architecture(model.config)  # refuse before writing anything
    if out.exists():
        raise UserError(f"{out} already exists: pass another --out, or remove it first")
    # written as out.partial, then renamed: a failed export never looks like a finished one
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        raise UserError(f"{partial} exists (an interrupted export?): remove it first")
    try:
        partial.mkdir(parents=True)
        write_weights(model, name, partial)
        write_tokenizer(tokenization, partial)
        max_diff = verify(model, partial, tokenization)
        partial.rename(out)
    except BaseException as e:
        # ours alone to remove: it did not exist above
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError):
            why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
            raise UserError(f"could not write {out} ({why}), nothing written: "
                            "pick another --out") from None
        raise
    return name, max_diff


def main(argv=None):
    config = ExportConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    set_threads(config.threads)
    checkpoint = load_checkpoint(config.ckpt)
    model_config = GPTConfig(**checkpoint["model_config"])
    architecture(model_config)  # a one-line refusal before anything is loaded or written
    model = model_from_checkpoint(checkpoint)
    tokenization = checkpoint["data_meta"]["tokenization"]
    for note in expansions(model_config):
        print(f"expanding {note}")
    t0 = time.perf_counter()
    name, max_diff = export(model, tokenization, config.out)
    print(f"wrote {config.out} ({name}, {tokenization} tokenizer) in "
          f"{time.perf_counter() - t0:.1f} s; verified: max |logit difference| {max_diff:.2e} "
          f"<= {LOGIT_TOLERANCE:.0e}, greedy generation identical")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(config.out)!r}); "
          f"evaluate it: lm_eval --model hf --model_args pretrained={config.out} --tasks=...")


if __name__ == "__main__":
    run(main)
