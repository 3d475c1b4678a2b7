"""
Generate text from a checkpoint written by train.py, streaming it as it comes.

    python sample.py                                  # from out/ckpt.pt
    python sample.py --prompt="ROMEO:" --max_new_tokens=300 --temperature=0.7
    python sample.py --prompt=FILE:prompt.txt --num_samples=3

Generation uses the KV cache: each new token costs one position's work, not
a pass over the whole context. Bytes that do not form valid UTF-8 (a byte
model can emit any byte) are shown as the replacement character. A pooled
byte model streams byte by byte like a bytes model: its byte layers and its
core (at chunk ends) each keep a KV cache, and --max_new_tokens counts bytes.
"""

import codecs
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError, parse_config, pick_device, run, set_threads
from model import load_checkpoint, model_from_checkpoint
from tokenizer import encode, unit_to_bytes


@dataclass
class SampleConfig:
    ckpt: str = "out/ckpt.pt"
    prompt: str = "\n"  # the text to continue; FILE:path reads it from a file
    num_samples: int = 1
    max_new_tokens: int = 500  # 0 prints the prompt alone
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 200  # sample among the k likeliest tokens; 0 = all
    top_p: float = 1.0  # nucleus sampling: the likeliest tokens holding this much mass
    use_cache: bool = True  # false recomputes the whole context every token (slow; for comparison)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0 = the cores idle at the start


def check_settings(config):
    """Refuse, in one line, a setting that cannot sample anything sensible."""
    if config.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {config.num_samples}")
    if config.max_new_tokens < 0:
        raise UserError(f"--max_new_tokens must be 0 (the prompt alone) or more, "
                        f"got {config.max_new_tokens}")
    if not (math.isfinite(config.temperature) and config.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), "
                        f"got {config.temperature}")
    if config.top_k < 0:
        raise UserError(f"--top_k must be 0 (every token) or more, got {config.top_k}")
    if not 0 <= config.top_p <= 1:
        raise UserError(f"--top_p must be in [0, 1], got {config.top_p}")
    if not 0 <= config.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {config.seed}")


def read_prompt(prompt):
    """The prompt's text, refusing bytes that are not UTF-8 (the command line keeps them as escapes)."""
    if prompt.startswith("FILE:"):
        path = Path(prompt[len("FILE:"):])
        if not path.is_file():
            raise UserError(f"prompt file {path} not found")
        try:  # newlines as read_text has them: \r\n and \r become \n
            return path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                            f"{e.start}): convert it, e.g. iconv -f latin1 -t utf-8") from None
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"--prompt is not valid UTF-8 (at character {e.start}): pass UTF-8 text, "
                        "or a UTF-8 file with --prompt=FILE:path") from None
    return prompt


def stream_sample(model, prompt_ids, to_bytes, config, generator):
    """Write one sample to stdout as it is generated; return the number of new tokens."""
    # an incremental decoder holds a character split over tokens until its last byte comes
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    n_tokens = 0
    for token in model.generate_stream(
            idx, config.max_new_tokens, temperature=config.temperature, top_k=config.top_k or None,
            top_p=config.top_p, use_cache=config.use_cache, generator=generator):
        sys.stdout.write(decoder.decode(to_bytes(token)))
        sys.stdout.flush()
        n_tokens += 1
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    sys.stdout.flush()
    return n_tokens


def main(argv=None):
    config = SampleConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    check_settings(config)
    device = pick_device(config.device)  # before the checkpoint: a missing GPU is not a damaged file
    set_threads(config.threads)  # on a GPU too: --threads means the same everywhere
    prompt = read_prompt(config.prompt)
    checkpoint = load_checkpoint(config.ckpt, device)
    model = model_from_checkpoint(checkpoint).to(device)
    tokenization = checkpoint.get("data_meta", {}).get("tokenization")
    if tokenization is None:
        raise UserError(f"{config.ckpt} does not say how its text was tokenized (no data_meta): "
                        "sample from a checkpoint that train.py, distill.py or reparam.py wrote")
    to_bytes = unit_to_bytes(tokenization)
    prompt_ids = encode(tokenization, prompt)
    if not prompt_ids:
        raise UserError("the prompt is empty: pass --prompt=TEXT (the default is a newline)")
    block_size = model.config.block_size
    if len(prompt_ids) > block_size:
        print(f"note: the prompt is {len(prompt_ids)} tokens and the model reads {block_size}: it continues "
              f"from the prompt's last {block_size}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    for _ in range(config.num_samples):
        sys.stdout.write(prompt)
        t0 = time.perf_counter()
        n_tokens = stream_sample(model, prompt_ids, to_bytes, config, generator)
        elapsed = time.perf_counter() - t0
        rate = f": {n_tokens / elapsed:,.0f} tokens/s" if n_tokens else ""
        print(f"--- {n_tokens} tokens in {elapsed:.2f} s{rate}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
