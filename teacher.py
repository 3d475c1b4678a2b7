"""
Teachers for distill.py: a frozen model that maps token ids to logits over the
student's vocabulary. A train.py checkpoint (ckpt.pt, the student's
tokenization) or a Hugging Face causal LM (a local folder, or a .gguf file that
transformers dequantises with the gguf package installed), checked against the
data it will read. Also the teacher's own bits per byte, through train.evaluate.
"""

import hashlib
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from cli import UserError
from model import load_checkpoint, model_from_checkpoint

TEACHER_RECIPE = "python train.py --n_layer=6 --n_embd=256 --n_head=8 --out_dir=out-distill/teacher"
TEACHER_EVAL_BATCH = 8  # teacher windows per forward pass when measuring its bits per byte


class Teacher:
    """
    A frozen model that maps token ids (B, T) to logits over the student's
    vocabulary and its final hidden states. Wraps a train.py GPT or a
    Hugging Face causal LM behind the same call.
    """

    def __init__(self, module, context, vocab_size, fingerprint, is_hf):
        self.module = module.eval().requires_grad_(False)
        self.context, self.vocab_size, self.fingerprint, self.is_hf = context, vocab_size, fingerprint, is_hf
        self.dtype = next(module.parameters()).dtype
        self.n_embd = module.config.hidden_size if is_hf else module.config.n_embd

    @torch.no_grad()
    def __call__(self, idx):
        if self.is_hf:
            out = self.module(input_ids=idx, output_hidden_states=True)
            logits, hidden = out.logits, out.hidden_states[-1]
        else:
            hidden = self.module.hidden_states(idx)
            logits = self.module.head(hidden)  # GPT.head: soft-capped if the teacher was trained so
        # a Hugging Face head may be padded past the tokenizer's vocabulary: ids the data never holds
        return logits[..., :self.vocab_size].float(), hidden.float()


def fingerprint_module(module):
    """sha256 of every parameter and buffer, in order: names a teacher by its weights, not its path."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_teacher(path, dataset, device):
    """The teacher at path, checked against the dataset's tokenization and vocabulary, frozen, on device."""
    path = Path(path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if path.is_dir() or path.suffix == ".gguf":
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise UserError(f"{path} is a Hugging Face teacher: pip install transformers (and gguf for .gguf files)") from None
        if not path.exists():
            raise UserError(f"no teacher at {path}")
        if not dataset.meta["tokenization"].startswith("hf:"):
            raise UserError(f"a Hugging Face teacher needs data in its own tokenization: "
                            f"python data/prepare.py --tokenization=hf --tokenizer_dir={path}")
        if path.suffix == ".gguf":
            module = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        else:
            module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        config = module.config
        context = getattr(config, "n_positions", None) or config.max_position_embeddings
        if module.config.vocab_size < dataset.meta["vocab_size"]:
            raise UserError(f"the teacher's vocabulary ({config.vocab_size}) is smaller than the data's "
                            f"({dataset.meta['vocab_size']}): prepare the data with the teacher's tokenizer")
        is_hf = True
    else:
        if not path.is_file():
            raise UserError(f"no teacher at {path}: train one first ({TEACHER_RECIPE}) or pass --teacher=PATH")
        checkpoint = load_checkpoint(path)
        teacher_tokens = checkpoint.get("data_meta", {}).get("tokenization")
        if checkpoint["model_config"].get("embedder") == "pooled":
            raise UserError(f"{path} is a pooled byte model: distill.py takes a token or bytes teacher "
                            "(train one without --embedder=pooled)")
        module = model_from_checkpoint(checkpoint).to(dtype)
        if teacher_tokens != dataset.meta["tokenization"] or module.config.vocab_size != dataset.meta["vocab_size"]:
            raise UserError(f"the teacher was trained on {teacher_tokens} tokens (vocabulary {module.config.vocab_size}), "
                            f"the data is {dataset.meta['tokenization']} ({dataset.meta['vocab_size']}): "
                            f"distill on data with the teacher's tokenization")
        context, is_hf = module.config.block_size, False
    teacher = Teacher(module.to(device), context, dataset.meta["vocab_size"], fingerprint_module(module), is_hf)
    print(f"teacher: {path} ({sum(p.numel() for p in module.parameters()):,} parameters, "
          f"context {context}, {str(teacher.dtype).removeprefix('torch.')}), frozen")
    return teacher


class TeacherAsModel(nn.Module):
    """The teacher behind the model(x, y, reduction) call train.evaluate makes: its bits per byte, by the one function."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.module = teacher, teacher.module
        self.eval()  # evaluate() puts the model back in the mode it found: the teacher stays in eval mode

    def forward(self, x, y, reduction="mean"):
        logits, _ = self.teacher(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction=reduction)


def report_teacher_bpb(teacher, teacher_data, context, eval_tokens):
    """The teacher's val loss and bits per byte over eval_tokens of its validation data, in windows of context tokens."""
    t0 = time.perf_counter()
    result = train.evaluate(TeacherAsModel(teacher), teacher_data.val, teacher_data.token_bytes, context,
                            eval_tokens, batch_size=TEACHER_EVAL_BATCH)
    print(f"teacher: val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits per byte "
          f"(windows of {context} tokens, {time.perf_counter() - t0:.0f} s)")
    return result
