"""
Latency and throughput benchmark: how fast is a super tiny model, and where does its time go?

    python bench.py                                        # the quick default: cpu-tiny and stlm-10m
    python bench.py --presets=cpu-tiny,stlm-10m,stlm-50m --seq_lens=1,16,64,128 --threads=2
    python bench.py --ckpts=out/ckpt.pt,out/ckpt_merged.pt  # checkpoints side by side
    python bench.py --ffns=swiglu,rep_linear               # FFN types, a rep_* one merged beside it
    python bench.py --vocab_size=50257 --n_layer=6         # the presets reshaped
    python bench.py --device=cuda --dtype=bfloat16 --cuda_graphs

For every model it times prefill (batch 1, the head on the last position only: what the first
token costs) and where that time goes: the FFN's share, 1 - t(FFNs removed) / t, and on a CPU the
time inside each kind of module. Then decode per token with the KV cache (the step generation
runs), generation with the cache and without it (nanoGPT's window of block_size tokens
recomputed for every token), and train.py's training step; decode and training with their model
FLOPs utilisation (MFU) against a matmul peak measured beside them. Latencies are medians with
p10/p90 after warm-up calls; the tables name the device, torch version, dtype, threads and load
average, and the JSON file keeps every number. A pooled byte model is timed per byte, on random
bytes (its decode has no MFU: its steps differ).
"""

import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

import reparam
import optim
import train
from cli import UserError, parse_config, pick_device, run, set_threads
from model import FFNS, GPT, load_checkpoint, model_from_checkpoint, preset_config
from tokenizer import BYTE_VOCAB, token_byte_table


@dataclass
class BenchConfig:
    # what to measure
    presets: str = "cpu-tiny,stlm-10m"  # model.py's names; skipped if only --ckpts is given
    ckpts: str = ""  # checkpoint paths, timed as trained
    ffns: str = ""  # FFN types to run each preset with; "" = the preset's own
    # the sweep; lengths beyond a model's block_size are skipped and shown as "-"
    seq_lens: str = "1,16,64"  # prefill lengths (and where the time goes at each)
    context_lens: str = "1,16,64"  # decode: positions the new token attends to (itself + the cache)
    gen_tokens: int = 200  # tokens generated with and without the cache (0 skips generation)
    train_batch: int = 12  # training step: nanoGPT's CPU batch...
    train_len: int = 64  # ...and context (at most block_size); 0 = each model's block_size
    # timing
    repeats: int = 30  # timed calls per measurement (the median and p10/p90 are over these)
    warmup: int = 5  # untimed calls first: allocator, caches, lazy initialisation
    train_repeats: int = 3  # training steps are slow: fewer of them
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 | float16 (training autocasts to it)
    threads: int = 0  # CPU threads for torch; 0 = the cores idle at the start
    cuda_graphs: bool = False  # replay prefill and decode as CUDA graphs (one launch, not hundreds)
    out: str = "out-bench/bench.json"  # the JSON report


@dataclass
class PresetShape:
    """The model keys that reshape every preset; None keeps the preset's own value."""
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    block_size: Optional[int] = None  # room for longer --seq_lens
    vocab_size: Optional[int] = None  # 50257: the embedding table and head of GPT-2's vocabulary
    embedder: Optional[str] = None  # pooled: byte_tokenizer.py's pooled byte model, timed per byte
    byte_width: Optional[int] = None  # pooled: the width of its local byte layers


SPLIT_CATEGORIES = ("embedding", "attention", "ffn", "norm", "head", "other")
MISSING = "-"  # a table cell not measured: longer than the model's block_size, or hooks on a GPU


# ----------------------------------------------------------------------------
# timing

def summarize_ms(samples_ms):
    """Median and p10/p90 of timings in milliseconds (nearest-rank percentiles)."""
    ordered = sorted(samples_ms)
    rank = lambda q: ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered), "p10_ms": rank(10), "p90_ms": rank(90)}


def cuda_graphed(fn, device):
    """
    fn captured as a CUDA graph: the result replays its kernels in one launch and returns the
    output they write. fn must do the same work on the same tensors every call.
    """
    # warm up off the main stream, as torch.cuda.graph requires
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()

    def replay():
        graph.replay()
        return output
    return replay


def time_fn(fn, repeats=30, warmup=5, device="cpu", cuda_graphs=False):
    """
    Wall-clock ms of fn() over repeats calls after warmup calls; on a GPU from
    an idle GPU (synchronised) until the call's kernels have finished.
    """
    fn = cuda_graphed(fn, device) if cuda_graphs else fn
    # CUDA runs asynchronously: wait for the GPU before starting the clock and before stopping it
    cuda = torch.device(device).type == "cuda"
    sync = partial(torch.cuda.synchronize, device) if cuda else lambda: None
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(1000 * (time.perf_counter() - t0))
    return summarize_ms(samples)


def last_logits(model, idx, cache=None):
    """Logits of the last position only: all a sampler needs, so the head runs once per sequence."""
    return model.head(model.hidden_states(idx, cache)[:, -1])


def time_prefill(model, seq_len, repeats=30, warmup=5, cuda_graphs=False):
    """Prefill latency: hidden states of a (1, seq_len) prompt, the head on its last position only."""
    device = next(model.parameters()).device
    idx = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    prefill = torch.inference_mode()(partial(last_logits, model, idx))
    return time_fn(prefill, repeats, warmup, device, cuda_graphs)


def time_decode(model, context_len, repeats=30, warmup=5, cuda_graphs=False):
    """
    One cached decode step whose new token attends to context_len positions (context_len - 1
    cached, plus itself); the cache is rewound before every call, so each decodes the same position.
    """
    config, device = model.config, next(model.parameters()).device
    # fill the cache with the context once, untimed
    with torch.inference_mode():
        cache = model.new_cache(1, device, next(model.parameters()).dtype)
        prompt = torch.randint(0, config.vocab_size, (1, context_len), device=device)
        if context_len > 1:
            model.hidden_states(prompt[:, :-1], cache)

    # the step generation runs for each new token
    step = model.one_token_step()

    @torch.inference_mode()
    def decode():
        cache.length = context_len - 1
        return step(prompt[:, -1:], cache)

    return time_fn(decode, repeats, warmup, device, cuda_graphs)


def time_generation(model, n_tokens, use_cache, token_bytes=None):
    """
    Tokens/s of model.generate_stream from a one-token prompt, each token read
    back to the host as a streaming sampler must; with token_bytes (bytes of
    text per token id) also bytes/s. use_cache=False is nanoGPT's sliding window.
    """
    device = next(model.parameters()).device
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    # nanoGPT sample.py's temperature and top-k, so that the baseline does its work
    sample = partial(model.generate_stream, prompt, temperature=0.8, top_k=200, use_cache=use_cache,
                     generator=generator)
    # a short untimed generation first: the allocator, lazy kernels
    for _ in sample(16):
        pass
    t0 = time.perf_counter()
    ids = [token.item() for token in sample(n_tokens)]
    seconds = time.perf_counter() - t0
    return {"tokens": n_tokens, "use_cache": use_cache, "tokens_per_s": n_tokens / seconds,
            "bytes_per_s": None if token_bytes is None else sum(token_bytes[i] for i in ids) / seconds}


# ----------------------------------------------------------------------------
# training throughput and model FLOPs utilisation

def matmul_params(model):
    """
    Weights each token is multiplied by in one forward pass: every matrix of
    every block application (a shared FFN or a repeated block counts each time
    it runs), any FFN type, plus the head. The embedding is a lookup, not a matmul.
    """
    per_pass = sum(p.numel() for block in model.h for p in block.parameters() if p.dim() >= 2)
    return model.config.block_repeat * per_pass + model.lm_head.weight.numel()


def train_flops_per_token(model, seq_len):
    """
    Training FLOPs per token, PaLM's formula (Chowdhery et al. 2022, appendix B; nanoGPT's
    estimate_mfu): 6N for the weights (2 FLOPs per multiply-add forward, twice that backward)
    plus 12 * layers * width * T for attention's QK^T and AV, not halved for the causal mask.
    """
    config = model.config
    # a pooled model: forward + backward = 3 forwards, its core's share counted on random bytes
    if config.embedder == "pooled":
        return 3 * reparam.forward_flops(model, seq_len) / seq_len
    applications = config.n_layer * config.block_repeat
    return 6 * matmul_params(model) + 12 * applications * config.n_embd * seq_len


def decode_flops_per_token(model, context_len):
    """
    FLOPs of one cached decode step whose token attends to context_len positions: 2 per weight (a
    multiply-add) and 4 * width * context_len per block application for QK^T and AV. None for a
    pooled model, whose core runs only at a chunk's end, so that its steps differ.
    """
    config = model.config
    if config.embedder == "pooled":
        return None
    return 2 * matmul_params(model) + 4 * config.n_layer * config.block_repeat * config.n_embd * context_len


def matmul_peak(device, dtype, repeats=10):
    """The best FLOP/s of a square matmul on this device, dtype and thread count: MFU's denominator."""
    best = 0.0
    # sizes big enough to saturate the device, small enough to be quick; the best one wins
    for n in (2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_fn(lambda: torch.mm(a, b), repeats, warmup=2, device=device)["median_ms"]
        best = max(best, 2 * n ** 3 / (ms / 1000))
    return best


def training_step(model, train_config, batch_size, seq_len, dtype):
    """
    A function running one training step as train.py runs it (forward under
    autocast, backward, gradient clipping, the recipe's optimizer) on a fixed
    batch of random tokens, training model itself (pass a copy to keep the
    original); it returns the batch's loss before the step.
    """
    device = next(model.parameters()).device
    optimizer = optim.make_optimizer(model, train_config, str(device))
    shape = (batch_size, seq_len)
    x, y = (torch.randint(0, model.config.vocab_size, shape, device=device) for _ in range(2))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # train.py's step repeated here in a few lines, without its gradient accumulation, logging
    # and checks, so that the step alone is timed
    def step():
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.GRAD_CLIP, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def time_train_step(model, batch_size, seq_len, dtype, repeats=3):
    """Median ms and tokens/s of a train.py step (its default recipe, on float32 master weights)."""
    trained_copy = copy.deepcopy(model).float().train()
    step = training_step(trained_copy, train.TrainConfig(), batch_size, seq_len, dtype)
    # one untimed step: the optimizers allocate their state in the first
    timing = time_fn(step, repeats, 1, next(model.parameters()).device)
    tokens_per_s = batch_size * seq_len / (timing["median_ms"] / 1000)
    return {**timing, "batch_size": batch_size, "seq_len": seq_len, "tokens_per_s": tokens_per_s}


# ----------------------------------------------------------------------------
# where the time goes

@contextlib.contextmanager
def module_timer(model):
    """
    Yields {category: wall-clock ms inside its modules}, filled by forward hooks
    while the block runs: CPU only (on a GPU a hook would time kernel launches).
    A module shared between blocks is hooked once and timed at every call;
    the residual adds between modules are in no category.
    """
    totals_ms, started, handles = {}, [], []
    pairs = [(model.wte, "embedding"), (model.wpe, "embedding"), (model.ln_f, "head"),
             (model.lm_head, "head")]
    for block in model.h:
        pairs += [(block.ln_1, "norm"), (block.attn, "attention"), (block.ln_2, "norm"),
                  (block.ffn, "ffn")]

    def start(module, args):
        started.append(time.perf_counter())

    def stop(category, module, args, output):
        ms = 1000 * (time.perf_counter() - started.pop())
        totals_ms[category] = totals_ms.get(category, 0.0) + ms

    # each module once, even where blocks share it
    for module, category in {id(m): (m, c) for m, c in pairs if m is not None}.values():
        handles.append(module.register_forward_pre_hook(start))
        handles.append(module.register_forward_hook(partial(stop, category)))
    try:
        yield totals_ms
    finally:
        for handle in handles:
            handle.remove()


def time_split(model, seq_len, prefill_ms, repeats=30, warmup=5, cuda_graphs=False):
    """
    Where batch-1 prefill time goes: the FFN's share, 1 - t(without FFN) / t, and on a CPU the ms
    inside each category of module ("other": the rest, glue between modules and the hooks).
    """
    # the model with every FFN taken out, put back whatever happens
    ffns = [block.ffn for block in model.h]
    try:
        for block in model.h:
            block.ffn = nn.Identity()
        without_ffn = time_prefill(model, seq_len, repeats, warmup, cuda_graphs)["median_ms"]
    finally:
        for block, ffn in zip(model.h, ffns):
            block.ffn = ffn
    result = {"without_ffn_ms": without_ffn, "ffn_share_removed": 1 - without_ffn / prefill_ms,
              "module_ms": None}
    # no hooks on a GPU (they would time kernel launches) or in a pooled model, whose core runs
    # inside its byte layers (their times would nest)
    if next(model.parameters()).device.type != "cpu" or model.config.embedder == "pooled":
        return result
    idx = torch.randint(0, model.config.vocab_size, (1, seq_len))
    with module_timer(model) as totals_ms, torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(repeats):
            last_logits(model, idx)
        hooked_ms = 1000 * (time.perf_counter() - t0) / repeats
    result["module_ms"] = {category: ms / repeats for category, ms in totals_ms.items()}
    result["module_ms"]["other"] = hooked_ms - sum(result["module_ms"].values())
    return result


# ----------------------------------------------------------------------------
# the models to compare

def parse_list(text, kind, key):
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--{key} expects a comma-separated list of {kind.__name__}, "
                        f"got {text!r}") from None
    if kind is int and any(v < 1 for v in values):
        raise UserError(f"--{key} values must be at least 1, got {text}")
    return values


def merged_variant(model):
    """The merged (inference) form of a model with a reparameterizable FFN not merged yet, else None."""
    if model.config.ffn not in reparam.MERGEABLE:
        return None
    # an untrained rep_anneal is timed at the end of its schedule, the form it merges from
    return reparam.reparameterize(reparam.complete_anneal(copy.deepcopy(model)))


def build_variants(config, presets, shape, dtype, device):
    """
    [(name, model, bytes of text per token id or None)]: every preset with every FFN type, a rep_*
    one followed by its merged form, then every checkpoint as it is (reparam.py merges a trained one).
    """
    variants = []
    for preset in presets:
        for ffn in parse_list(config.ffns, str, "ffns") or [None]:
            torch.manual_seed(0)
            model = GPT(preset_config(preset, **shape, **({"ffn": ffn} if ffn else {}))).eval()
            # random weights: bytes/s means something for a byte model only, where it equals tokens/s
            tokenization = "bytes" if model.config.vocab_size == BYTE_VOCAB else None
            name = f"{preset}/{ffn}" if ffn else preset
            variants.append((name, model, tokenization))
            if (merged := merged_variant(model)) is not None:
                variants.append((f"{name} merged", merged, tokenization))
    # a checkpoint knows its tokenization, so its bytes/s is the text's
    for path in parse_list(config.ckpts, str, "ckpts"):
        checkpoint = load_checkpoint(path)
        tokenization = checkpoint.get("data_meta", {}).get("tokenization", "bytes")
        model = model_from_checkpoint(checkpoint)
        model.text = validation_window(checkpoint, model.config.block_size)
        variants.append((path, model, tokenization))
    if not variants:
        raise UserError("nothing to benchmark: pass --presets=NAMES or --ckpts=PATHS")
    byte_counts = lambda tokenization: tokenization and [len(b) for b in token_byte_table(tokenization)]
    return [(name, model.to(device=device, dtype=dtype), byte_counts(tokenization))
            for name, model, tokenization in variants]


def validation_window(checkpoint, block_size):
    """The first window of a checkpoint's own validation data, when it is at hand: (ids, bytes)."""
    try:
        dataset = train.load_dataset(checkpoint["train_config"]["dataset"], block_size)
    except (KeyError, UserError):
        return None
    ids = torch.from_numpy(dataset.val[:block_size].astype("int64"))
    return ids[None], int(dataset.token_bytes[ids].sum())


def flops_per_byte(model):
    """
    FLOPs per byte of text, inference and training (a forward pass, and forward and backward:
    three forwards), counted over a context-long window: of the model's own validation text
    when bench has it (a pooled model's core runs once per chunk of it), else of random ids for
    a byte-level vocabulary (one byte each); None for a token model with no text at hand.
    """
    T, text = model.config.block_size, getattr(model, "text", None)
    if text is None and model.config.vocab_size > 257:
        return None
    idx, n_bytes = text if text is not None else (None, T)
    inference = reparam.forward_flops(model, T, idx) / n_bytes
    return {"inference": inference, "train": 3 * inference, "on_text": text is not None}


# ----------------------------------------------------------------------------
# one model, every measurement

def bench_model(name, model, token_bytes, config, dtype, progress):
    """Every measurement of one model, as a JSON-ready dict; main adds MFU once the run's peak is known."""
    block_size, device = model.config.block_size, next(model.parameters()).device
    fits = lambda key: [n for n in parse_list(getattr(config, key), int, key) if n <= block_size]
    timing = dict(repeats=config.repeats, warmup=config.warmup, cuda_graphs=config.cuda_graphs)
    result = {"name": name, "config": dataclasses.asdict(model.config), "params": model.num_params(),
              "matmul_params": matmul_params(model), "flops_per_byte": flops_per_byte(model), "prefill": []}
    progress.set_description(f"{name}: prefill")
    for t in fits("seq_lens"):
        full = time_prefill(model, t, **timing)
        split = time_split(model, t, full["median_ms"], **timing)
        result["prefill"].append({"seq_len": t, **full, **split})
    progress.set_description(f"{name}: decode")
    result["decode"] = [{"context_len": t, **time_decode(model, t, **timing),
                         "flops_per_token": decode_flops_per_token(model, t)} for t in fits("context_lens")]
    progress.set_description(f"{name}: train")
    # the matmul peak beside the step it divides, so that both see the same machine
    train_len = min(config.train_len or block_size, block_size)
    step = time_train_step(model, config.train_batch, train_len, dtype, config.train_repeats)
    result["train"] = {**step, "flops_per_token": train_flops_per_token(model, train_len),
                       "matmul_peak_flops": matmul_peak(device, dtype)}
    progress.set_description(f"{name}: generate")
    result["generation"] = [time_generation(model, config.gen_tokens, use_cache, token_bytes)
                            for use_cache in (True, False) if config.gen_tokens]
    return result


# ----------------------------------------------------------------------------
# reporting

def environment(device, dtype):
    cuda = device.type == "cuda"
    tf32 = cuda and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.machine(),
            "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch.") + (" (TF32 matmuls)" if tf32 else ""),
            "threads": None if cuda else torch.get_num_threads(), "cpu_count": os.cpu_count()}


def table(title, header, rows):
    """A markdown table under its title, as lines."""
    lines = [title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def latency_cell(entries, key, value):
    """The median (p10-p90) of the entry measured at key = value, or MISSING."""
    entry = next((e for e in entries if e[key] == value), None)
    if entry is None:
        return MISSING
    return f"{entry['median_ms']:.2f} ({entry['p10_ms']:.2f}-{entry['p90_ms']:.2f})"


def decode_cell(entries, context_len):
    """The decode latency at context_len, and the step's MFU where its FLOPs are counted."""
    cell = latency_cell(entries, "context_len", context_len)
    entry = next((e for e in entries if e["context_len"] == context_len), None)
    if entry is None or entry["mfu"] is None:
        return cell
    return f"{cell}, MFU {100 * entry['mfu']:.2f}%"


def latency_tables(models, seq_lens, context_lens):
    prefill = [[m["name"], f"{m['params']['total'] / 1e6:.2f}M",
                *[latency_cell(m["prefill"], "seq_len", t) for t in seq_lens]] for m in models]
    decode = [[m["name"], *[decode_cell(m["decode"], t) for t in context_lens]] for m in models]
    return (table("Prefill latency, batch 1 (ms; head on the last position only)",
                  ["model", "params", *[f"T={t}" for t in seq_lens]], prefill)
            + table("Decode latency per token with the KV cache (ms; context = cached positions + the "
                    "new token), and its model FLOPs utilisation against the matmul peak",
                    ["model", *[f"ctx={t}" for t in context_lens]], decode))


def rate_cell(generation, key="tokens_per_s"):
    if generation is None or generation[key] is None:
        return MISSING
    return f"{generation[key]:,.0f}"


def throughput_table(models):
    rows = []
    for m in models:
        step, gen = m["train"], {g["use_cache"]: g for g in m["generation"]}
        speedup = f"{gen[True]['tokens_per_s'] / gen[False]['tokens_per_s']:.1f}x" if gen else MISSING
        per_byte = m["flops_per_byte"]
        per_byte = MISSING if per_byte is None else f"{per_byte['train'] / 1e6:.2f}M / {per_byte['inference'] / 1e6:.2f}M"
        rows.append([m["name"], f"{step['batch_size']}x{step['seq_len']}", f"{step['tokens_per_s']:,.0f}",
                     f"{step['flops_per_token'] / 1e6:.1f}M", per_byte, f"{100 * step['mfu']:.1f}%",
                     rate_cell(gen.get(True)), rate_cell(gen.get(False)), speedup,
                     rate_cell(gen.get(True), "bytes_per_s")])
    return table("Throughput: a training step (forward, backward, train.py's optimizers); generation "
                 "through generate_stream (no cache: nanoGPT's window of block_size tokens recomputed "
                 "for every token)",
                 ["model", "train batch", "train tok/s", "FLOPs/token", "FLOPs/byte (train / inference)", "MFU",
                  "gen tok/s (cache)",
                  "gen tok/s (no cache)", "speedup", "gen bytes/s (cache)"], rows)


def ffn_share_cell(share):
    # removing the FFNs removes work, so a model without them that times slower (share < 0) only
    # says that other processes slowed that run: shown as 0 and marked, the JSON keeps the measurement
    return f"{100 * share:.0f}%" if share >= 0 else "0% (noise)"


def split_table(models):
    rows = []
    for m in models:
        for p in m["prefill"]:
            hooked = p["module_ms"] and sum(p["module_ms"].values())
            shares = [f"{100 * p['module_ms'].get(c, 0) / hooked:.0f}%" if hooked else MISSING
                      for c in SPLIT_CATEGORIES]
            rows.append([m["name"], p["seq_len"], f"{p['median_ms']:.2f}", *shares,
                         ffn_share_cell(p["ffn_share_removed"])])
    return table("Where prefill time goes (shares of the time inside modules, from hooks, CPU only; "
                 "last column: 1 - t(no FFN) / t)",
                 ["model", "T", "ms", *SPLIT_CATEGORIES, "FFN (removed)"], rows)


def markdown_tables(report):
    """The report as markdown: latency, throughput and time split, under the environment line."""
    env, models, config = report["environment"], report["models"], report["bench_config"]
    seq_lens, context_lens = (parse_list(config[key], int, key) for key in ("seq_lens", "context_lens"))
    lines = [f"device {env['device']} ({env['device_name']}), torch {env['torch']}, {env['dtype']}, "
             f"threads {env['threads']}, matmul peak {env['matmul_peak_gflops']:.0f} GFLOP/s, "
             f"load average {env['load_average_1min']:.1f} on {env['cpu_count']} cores at the end "
             f"(much above the threads: other processes shared the CPU); ms as median (p10-p90)", ""]
    lines += latency_tables(models, seq_lens, context_lens)
    lines += throughput_table(models) + split_table(models)
    return "\n".join(lines)


def write_report(report, path):
    """The JSON report; the tables are printed first, so a path that cannot be written loses nothing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}): the tables above hold the "
                        "measurement; pass a writable --out to keep its JSON") from None


# ----------------------------------------------------------------------------
# the command line

def check_options(config):
    """Refuse counts that would time nothing (no repeats, an empty batch) or make no sense, and bad lists."""
    minimum = {"repeats": 1, "train_repeats": 1, "train_batch": 1, "train_len": 0, "warmup": 0,
               "gen_tokens": 0}
    for key, least in minimum.items():
        if getattr(config, key) < least:
            raise UserError(f"--{key} must be at least {least}, got {getattr(config, key)}")
    for key in ("seq_lens", "context_lens"):
        parse_list(getattr(config, key), int, key)
    for ffn in parse_list(config.ffns, str, "ffns"):
        if ffn not in FFNS:
            raise UserError(f"--ffns: {ffn} is not one of {', '.join(FFNS)}")


def setup_device(config):
    """The torch device and dtype; TF32 matmuls on CUDA (as train.py trains), the threads on a CPU."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.dtype not in dtypes:
        raise UserError(f"--dtype={config.dtype} is not one of {', '.join(dtypes)}")
    device = torch.device(pick_device(config.device))
    if config.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda_graphs needs --device=cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        set_threads(config.threads)
    return device, dtypes[config.dtype]


def main(argv=None):
    config, shape = BenchConfig(), PresetShape()
    assigned = parse_config([config, shape], sys.argv[1:] if argv is None else argv, usage=__doc__)
    check_options(config)
    # the keys given on the command line reshape every preset
    shape = {key: value for key, value in dataclasses.asdict(shape).items() if value is not None}
    # checkpoints alone when only they are named: `--ckpts=a,b` compares a and b
    named = "presets" in assigned or not config.ckpts
    presets = parse_list(config.presets, str, "presets") if named else []
    if shape and not presets:
        raise UserError(f"--{next(iter(shape))} changes the presets' shape, and a checkpoint is timed "
                        "as trained: add --presets=NAMES to time a preset reshaped")
    device, dtype = setup_device(config)
    variants = build_variants(config, presets, shape, dtype, device)

    # measure every model, one after the other
    report = {"environment": environment(device, dtype), "bench_config": dataclasses.asdict(config),
              "models": []}
    t0 = time.perf_counter()
    progress = tqdm(variants, unit="model", dynamic_ncols=True, file=sys.stderr)
    for name, model, token_bytes in progress:
        report["models"].append(bench_model(name, model, token_bytes, config, dtype, progress))
    report["seconds"] = time.perf_counter() - t0

    # a peak is a maximum: another process can only lower a measurement of it, so the run's best divides
    peak = max(m["train"]["matmul_peak_flops"] for m in report["models"])
    report["environment"].update(matmul_peak_gflops=peak / 1e9, load_average_1min=os.getloadavg()[0])
    for m in report["models"]:
        m["train"]["mfu"] = m["train"]["tokens_per_s"] * m["train"]["flops_per_token"] / peak
        for d in m["decode"]:
            flops = d["flops_per_token"]
            d["mfu"] = None if flops is None else flops / (d["median_ms"] / 1000) / peak
    # the tables first: a --out that cannot be written then loses nothing
    print(markdown_tables(report))
    write_report(report, Path(config.out))
    print(f"wrote {config.out}; measured in {report['seconds']:.0f} s")


if __name__ == "__main__":
    run(main)
