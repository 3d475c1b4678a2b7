"""
Latency and throughput benchmark: how fast is a super tiny model, and where
does its time go?

    python bench.py                                     # the quick default: cpu-tiny and stlm-10m at a few lengths
    python bench.py --presets=cpu-tiny,stlm-10m,stlm-50m --seq_lens=1,16,64,128 --threads=2
    python bench.py --ckpts=out/ckpt.pt                 # a trained model, with bytes/s from its own samples
    python bench.py --ffns=swiglu,rep_linear            # FFN types side by side (merged too, when reparam.py has them)
    python bench.py --tokenizations=bytes,bpe           # a 256-byte vs a 50,257-token vocabulary
    python bench.py --device=cuda --dtype=bfloat16 --cuda_graphs
    python bench.py --help                              # every key; GPTConfig keys (--n_layer=6) override the presets

It measures, for every model:
- prefill latency: hidden states of a prompt, the head on its last position
  only (what producing the first token costs), batch 1 and a batch sweep;
- decode latency per token with the KV cache, at a given context length;
- end-to-end generation tokens/s through model.generate_stream, with the
  cache and without it (nanoGPT's sample.py recomputes the whole window every
  token: the baseline the cache is measured against);
- training tokens/s of a full step (forward, backward, clipping, AdamW) and
  the model FLOPs utilisation (MFU) against a matmul peak measured in the same
  run, on the same device, dtype and threads (next to each training step; the
  run's best peak is the denominator, since a busy CPU can only lower it);
- the time split into embedding, attention, FFN, norms and head (per-module
  timing hooks), cross-checked by timing the model with its FFN removed.

Timing is honest: warm-up calls first, then the median and p10/p90 of many
calls, under torch.inference_mode, a fixed thread count on CPU and CUDA events
with synchronisation on a GPU. Every table is printed with the device, torch
version, dtype and thread count; all numbers also go to a JSON file, and to a
PNG of latency against sequence length when matplotlib is installed.

Pooled byte models (byte_tokenizer.py) are not covered yet: that issue adds
its variant here (bytes/s then differs from tokens/s).
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

import torch
import torch.nn as nn
from tqdm import tqdm

import reparam
from cli import UserError, parse_config, run
from model import GPT, GPTConfig, KVCache, load_checkpoint, model_from_checkpoint, preset_config
from tokenizer import BYTE_VOCAB, GPT2_VOCAB, token_byte_table


@dataclass
class BenchConfig:
    # what to measure
    presets: str = "cpu-tiny,stlm-10m"  # comma-separated names from model.py; "" for none
    ckpts: str = ""  # comma-separated checkpoint paths, benchmarked as trained
    ffns: str = ""  # comma-separated FFN types to run each preset with; "" = the preset's own
    tokenizations: str = "bytes"  # bytes | bpe, comma-separated: sets each preset's vocabulary
    merged: bool = True  # also time the merged form of reparameterizable FFNs (needs reparam.py)
    # the sweep; lengths beyond a model's block_size are skipped and shown as "-"
    seq_lens: str = "1,16,64"  # prefill lengths
    batch_sizes: str = "1"  # prefill batch sweep
    context_lens: str = "1,16,64"  # decode: positions the new token attends to (itself + the cache)
    split_lens: str = "16,64"  # prefill lengths for the time split
    gen_tokens: int = 200  # tokens per generation run (0 skips generation)
    train_batch: int = 12  # training step: nanoGPT's CPU batch...
    train_len: int = 64  # ...and context; 0 = each model's block_size
    # timing
    repeats: int = 30  # timed calls per measurement (the median and p10/p90 are over these)
    warmup: int = 5  # untimed calls first: allocator, caches, lazy initialisation
    train_repeats: int = 5  # training steps are slow: fewer of them
    gen_repeats: int = 3  # generation runs per setting
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 | float16 (training autocasts to it)
    threads: int = 0  # CPU threads for torch; 0 = every core
    cuda_graphs: bool = False  # replay prefill/decode as CUDA graphs (one launch instead of hundreds)
    seed: int = 0
    out: str = "out-bench/bench.json"  # the JSON report; the plot goes next to it
    ingredients: str = ""  # only time a training step per ingredient (e.g. all, or relu2,muon): see INGREDIENTS


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOCAB_SIZES = {"bytes": BYTE_VOCAB, "bpe": GPT2_VOCAB}
PERCENTILES = (10, 90)  # the spread reported around each median
# matmul peak: square sizes tried (the best wins): big enough to saturate the device, small enough to be quick
PEAK_SIZES = {"cpu": (256, 512, 1024, 2048), "cuda": (2048, 4096, 8192)}
PEAK_REPEATS = 10
GEN_TEMPERATURE, GEN_TOP_K = 0.8, 200  # nanoGPT sample.py's defaults, so the baseline matches its work
MISSING = "-"  # a table cell the model cannot have (longer than its block_size)
BUSY_LOAD = 1.0  # a 1-minute load average above this before starting: another process is using the CPU


# ----------------------------------------------------------------------------
# timing

def summarize_ms(samples_ms):
    """Median and p10/p90 of timings in milliseconds (nearest-rank percentiles)."""
    ordered = sorted(samples_ms)
    rank = lambda q: ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered), "p10_ms": rank(PERCENTILES[0]), "p90_ms": rank(PERCENTILES[1])}


def cuda_graphed(fn, device):
    """
    fn captured as a CUDA graph; calling the result replays its kernels in one
    launch. fn must do the same work on the same tensors every call (a fixed
    prompt, a cache rewound to the same length).
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the main stream, as torch.cuda.graph requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_fn(fn, repeats=30, warmup=5, device="cpu"):
    """Time fn() repeats times after warmup calls: wall clock on CPU, CUDA events with synchronisation on a GPU."""
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(1000 * (time.perf_counter() - t0))
    return summarize_ms(samples)


def model_device(model):
    return next(model.parameters()).device


def time_prefill(model, seq_len, batch_size=1, repeats=30, warmup=5, cuda_graphs=False):
    """Prefill latency: hidden states of a (batch_size, seq_len) prompt and the head on its last position only."""
    device = model_device(model)
    idx = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)

    @torch.inference_mode()
    def prefill():
        return model.lm_head(model.hidden_states(idx)[:, -1])

    fn = cuda_graphed(prefill, device) if cuda_graphs else prefill
    return time_fn(fn, repeats, warmup, device)


def time_decode(model, context_len, batch_size=1, repeats=30, warmup=5, cuda_graphs=False):
    """
    Latency of one cached decode step whose new token attends to context_len
    positions: context_len - 1 in the KV cache, plus itself. The cache is
    rewound before every call, so each call decodes the same position.
    """
    config, device = model.config, model_device(model)
    with torch.inference_mode():
        cache = KVCache(config, batch_size, device, next(model.parameters()).dtype)
        prompt = torch.randint(0, config.vocab_size, (batch_size, context_len), device=device)
        if context_len > 1:
            model.hidden_states(prompt[:, :-1], cache)
    token = prompt[:, -1:]

    @torch.inference_mode()
    def decode():
        cache.length = context_len - 1
        return model.lm_head(model.hidden_states(token, cache)[:, -1])

    fn = cuda_graphed(decode, device) if cuda_graphs else decode
    return time_fn(fn, repeats, warmup, device)


def time_generation(model, n_tokens, use_cache, repeats=3, seed=0, token_bytes=None):
    """
    End-to-end tokens/s of model.generate_stream from a one-token prompt,
    each token read back to the host as a streaming sampler must. With
    token_bytes (bytes of text per token id), bytes/s of what it generated.
    """
    device = model_device(model)
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    sample = partial(model.generate_stream, prompt, temperature=GEN_TEMPERATURE, top_k=GEN_TOP_K,
                     use_cache=use_cache, generator=generator)
    for _ in sample(min(n_tokens, model.config.block_size)):  # warm-up: the allocator, lazy kernels
        pass
    rates, byte_rates = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids = [token.item() for token in sample(n_tokens)]
        seconds = time.perf_counter() - t0
        rates.append(len(ids) / seconds)
        if token_bytes is not None:
            byte_rates.append(sum(token_bytes[i] for i in ids) / seconds)
    return {"tokens_per_s": statistics.median(rates), "bytes_per_s": statistics.median(byte_rates) if byte_rates else None,
            "tokens": n_tokens, "use_cache": use_cache}


# ----------------------------------------------------------------------------
# training throughput and model FLOPs utilisation

def matmul_params(model):
    """
    Weights each token is multiplied by in one forward pass: every matrix of
    every block application (a shared FFN or a repeated block counts each time
    it runs) plus the output head. The embedding is a lookup, not a matmul
    (tied to the head, its matrix counts once, as the head). Works for any FFN
    type, since it counts the block's own matrices.
    """
    per_pass = sum(p.numel() for block in model.h for p in block.parameters() if p.dim() >= 2)
    return model.config.block_repeat * per_pass + model.lm_head.weight.numel()


def train_flops_per_token(model, seq_len):
    """
    Training FLOPs per token, PaLM's formula (Chowdhery et al. 2022,
    appendix B; nanoGPT's estimate_mfu): 6N for the weights (2 FLOPs per
    multiply-add forward, twice that backward) plus 12 * layers * width * T
    for attention's two T-long matmuls (QK^T and AV), counted as PaLM does,
    without halving for the causal mask.
    """
    config = model.config
    applications = config.n_layer * config.block_repeat
    return 6 * matmul_params(model) + 12 * applications * config.n_embd * seq_len


def matmul_peak(device, dtype, repeats=PEAK_REPEATS):
    """The best FLOP/s of a square matmul on this device, dtype and thread count: MFU's denominator."""
    best = 0.0
    for n in PEAK_SIZES["cuda" if str(device).startswith("cuda") else "cpu"]:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_fn(lambda: torch.mm(a, b), repeats, warmup=2, device=device)["median_ms"]
        best = max(best, 2 * n ** 3 / (ms / 1000))
    return best


def time_train_step(model, batch_size, seq_len, dtype, repeats=5, warmup=2):
    """A full training step on random tokens: forward, backward, gradient clipping, AdamW (train.py's settings)."""
    from train import TrainConfig, make_optimizer  # only the training measurement needs train.py
    device = model_device(model)
    model = copy.deepcopy(model).float().train()  # fp32 master weights, as train.py keeps them
    train_config = TrainConfig()
    optimizer = make_optimizer(model, train_config, str(device))
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    autocast = contextlib.nullcontext()
    if dtype != torch.float32:
        autocast = torch.autocast(device.type, dtype=dtype)

    def step():
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_fn(step, repeats, warmup, device)
    tokens_per_s = batch_size * seq_len / (timing["median_ms"] / 1000)
    return {**timing, "batch_size": batch_size, "seq_len": seq_len, "tokens_per_s": tokens_per_s}


# ----------------------------------------------------------------------------
# what each training-speed ingredient costs per step

# name -> (GPTConfig overrides, TrainConfig overrides), each applied alone to the baseline:
# nanoGPT's recipe at cpu-tiny (GELU, no QK-norm, AdamW, float32)
INGREDIENT_BASELINE = ({"ffn": "gelu", "qk_norm": False, "logit_softcap": 0.0}, {"optimizer": "adamw", "bf16": False})
INGREDIENTS = {
    "baseline": ({}, {}),
    "relu2": ({"ffn": "relu2"}, {}),
    "qk_norm": ({"qk_norm": True}, {}),
    "softcap": ({"logit_softcap": 15.0}, {}),
    "muon": ({}, {"optimizer": "muon"}),
    "bf16": ({}, {"bf16": True}),
}


def time_ingredients(names, batch_size, seq_len, rounds, warmup=3):
    """
    Median ms per training step (train.py's step: forward, backward, clipping,
    optimizer) of cpu-tiny with each ingredient, timed round-robin so that a
    change in machine load hits every ingredient alike.
    """
    import train  # only this measurement needs train.py
    steps = {}
    for name in names:
        model_keys, train_keys = ({**INGREDIENT_BASELINE[i], **INGREDIENTS[name][i]} for i in (0, 1))
        train_config = train.TrainConfig(**train_keys)
        model = GPT(preset_config("cpu-tiny", **model_keys)).train()
        optimizer = train.make_optimizer(model, train_config, "cpu")
        x, y = (torch.randint(0, model.config.vocab_size, (batch_size, seq_len)) for _ in range(2))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if train_config.bf16 else contextlib.nullcontext()

        def step(model=model, optimizer=optimizer, x=x, y=y, autocast=autocast, clip=train_config.grad_clip):
            with autocast:
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[name] = step
    samples = {name: [] for name in names}
    for i in tqdm(range(warmup + rounds), unit="round", file=sys.stderr):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                samples[name].append(1000 * (time.perf_counter() - t0))
    return {name: summarize_ms(ms) for name, ms in samples.items()}


def ingredient_table(timings, batch_size, seq_len):
    base = timings.get("baseline", next(iter(timings.values())))["median_ms"]
    lines = ["| ingredient | ms/step (median) | p10 | p90 | tokens/s | vs baseline |", "|---|---|---|---|---|---|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {t['median_ms']:.1f} | {t['p10_ms']:.1f} | {t['p90_ms']:.1f} | "
                     f"{batch_size * seq_len / t['median_ms'] * 1000:,.0f} | {t['median_ms'] / base:.2f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# where the time goes

def module_categories(model):
    """(module, category) for the modules a forward pass is built from; the residual adds fall in "other"."""
    pairs = [(model.wte, "embedding"), (model.wpe, "embedding"), (model.ln_f, "head"), (model.lm_head, "head")]
    for block in model.h:
        pairs += [(block.ln_1, "norm"), (block.attn, "attention"), (block.ln_2, "norm"), (block.mlp, "ffn")]
    return [(module, category) for module, category in pairs if module is not None]


class ModuleTimer:
    """
    Time spent inside each category of module, from forward pre/post hooks:
    wall clock on CPU, CUDA events on a GPU (kernel time, not launch time).
    A module shared between blocks is hooked once and timed at every call.
    """

    def __init__(self, model):
        self.cuda = model_device(model).type == "cuda"
        self.spans, self.open, self.handles, hooked = [], [], [], set()
        for module, category in module_categories(model):
            if id(module) not in hooked:
                hooked.add(id(module))
                self.handles.append(module.register_forward_pre_hook(self._start))
                self.handles.append(module.register_forward_hook(partial(self._stop, category)))

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, module, args):
        self.open.append(self._now())

    def _stop(self, category, module, args, output):
        self.spans.append((category, self.open.pop(), self._now()))

    def totals_ms(self):
        if self.cuda:
            torch.cuda.synchronize()
        totals = {}
        for category, start, end in self.spans:
            ms = start.elapsed_time(end) if self.cuda else 1000 * (end - start)
            totals[category] = totals.get(category, 0.0) + ms
        return totals

    def remove(self):
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def ffn_removed(model):
    """The model with every block's FFN replaced by the identity (restored on exit): what the FFN costs."""
    saved = [block.mlp for block in model.h]
    for block in model.h:
        block.mlp = nn.Identity()
    try:
        yield model
    finally:
        for block, mlp in zip(model.h, saved):
            block.mlp = mlp


def time_split(model, seq_len, repeats=30, warmup=5):
    """
    Shares of batch-1 prefill time per category (they sum to 1, "other" being
    the glue between modules), and the FFN's share measured the other way:
    1 - (latency without the FFN) / (latency with it).
    """
    device = model_device(model)
    idx = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    full = time_prefill(model, seq_len, repeats=repeats, warmup=warmup)["median_ms"]
    with ffn_removed(model):
        without_ffn = time_prefill(model, seq_len, repeats=repeats, warmup=warmup)["median_ms"]
    with torch.inference_mode():
        for _ in range(warmup):
            model.lm_head(model.hidden_states(idx)[:, -1])
        timer = ModuleTimer(model)
        try:
            t0 = time.perf_counter()
            for _ in range(repeats):
                model.lm_head(model.hidden_states(idx)[:, -1])
            if device.type == "cuda":
                torch.cuda.synchronize()
            hooked_ms = 1000 * (time.perf_counter() - t0)
            totals = timer.totals_ms()
        finally:
            timer.remove()
    shares = {category: ms / hooked_ms for category, ms in totals.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return {"seq_len": seq_len, "shares": shares, "prefill_ms": full, "without_ffn_ms": without_ffn,
            "ffn_share_removed": 1.0 - without_ffn / full}


# ----------------------------------------------------------------------------
# the models to compare

def parse_list(text, kind, key):
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--{key} expects a comma-separated list of {kind.__name__}, got {text!r}") from None


SWEEP_KEYS = ("seq_lens", "batch_sizes", "context_lens", "split_lens")


def parse_sweep(config):
    """The sweep's comma-separated lists as {key: [int, ...]}, each value at least 1."""
    sweep = {key: parse_list(getattr(config, key), int, key) for key in SWEEP_KEYS}
    for key, values in sweep.items():
        if any(v < 1 for v in values):
            raise UserError(f"--{key} values must be at least 1, got {getattr(config, key)}")
    return sweep


def merged_variant(model):
    """The merged (inference) form of a model whose reparameterizable FFN is not merged yet, else None."""
    if model.config.ffn not in reparam.MERGEABLE or model.config.ffn_merged:
        return None
    # an untrained rep_anneal is timed at the end of its schedule, the form it merges from
    return reparam.reparameterize(reparam.complete_anneal(copy.deepcopy(model)))


def build_variants(config, model_overrides, dtype, device):
    """[(name, model, tokenization, bytes per token id or None)] for every preset, FFN type, vocabulary and checkpoint."""
    variants = []

    def add(name, model, tokenization, token_bytes):
        variants.append((name, model, tokenization, token_bytes))
        merged = merged_variant(model) if config.merged else None
        if merged is not None:
            variants.append((f"{name} merged", merged, tokenization, token_bytes))

    tokenizations = parse_list(config.tokenizations, str, "tokenizations")
    for tokenization in tokenizations:
        if tokenization not in VOCAB_SIZES:
            raise UserError(f"--tokenizations: {tokenization!r} is not one of {', '.join(VOCAB_SIZES)} "
                            f"(pooled byte models are not benchmarked yet)")
    for preset in parse_list(config.presets, str, "presets"):
        for tokenization in tokenizations:
            for ffn in parse_list(config.ffns, str, "ffns") or [None]:
                overrides = {**model_overrides, "vocab_size": VOCAB_SIZES[tokenization]}
                name = preset + ("" if len(tokenizations) == 1 else f"/{tokenization}")
                if ffn:
                    overrides["ffn"], name = ffn, f"{name}/{ffn}"
                torch.manual_seed(config.seed)
                model = GPT(preset_config(preset, **overrides)).eval()
                # random weights: a byte model's bytes/s equals its tokens/s; a BPE one's would mean nothing
                token_bytes = [1] * BYTE_VOCAB if tokenization == "bytes" else None
                add(name, model, tokenization, token_bytes)
    for path in parse_list(config.ckpts, str, "ckpts"):
        checkpoint = load_checkpoint(path)
        tokenization = checkpoint.get("data_meta", {}).get("tokenization", "bytes")
        token_bytes = [len(b) for b in token_byte_table(tokenization)]
        add(path, model_from_checkpoint(checkpoint), tokenization, token_bytes)
    if not variants:
        raise UserError("nothing to benchmark: pass --presets=NAMES or --ckpts=PATHS")
    return [(name, model.to(device=device, dtype=dtype), tokenization, token_bytes)
            for name, model, tokenization, token_bytes in variants]


# ----------------------------------------------------------------------------
# one model, every measurement

def bench_model(name, model, tokenization, token_bytes, config, sweep, dtype, progress):
    """Every measurement of one model, as a JSON-ready dict; MFU is added by main once the run's peak is known."""
    block_size = model.config.block_size
    fits = lambda lengths: [n for n in lengths if n <= block_size]
    timing = dict(repeats=config.repeats, warmup=config.warmup)
    graphs = config.cuda_graphs
    result = {"name": name, "tokenization": tokenization, "config": dataclasses.asdict(model.config),
              "params": model.num_params(), "matmul_params": matmul_params(model)}
    progress.set_description(f"{name}: prefill")
    result["prefill"] = [{"batch_size": b, "seq_len": t, **time_prefill(model, t, b, cuda_graphs=graphs, **timing)}
                         for b in sweep["batch_sizes"] for t in fits(sweep["seq_lens"])]
    progress.set_description(f"{name}: decode")
    result["decode"] = [{"context_len": t, **time_decode(model, t, cuda_graphs=graphs, **timing)}
                        for t in fits(sweep["context_lens"])]
    progress.set_description(f"{name}: split")
    result["split"] = [time_split(model, t, **timing) for t in fits(sweep["split_lens"])]
    progress.set_description(f"{name}: train")
    train_len = min(config.train_len or block_size, block_size)
    train = time_train_step(model, config.train_batch, train_len, dtype, repeats=config.train_repeats)
    train["flops_per_token"] = train_flops_per_token(model, train_len)
    # the matmul peak next to the training step it divides, so both see the same machine state
    train["matmul_peak_flops"] = matmul_peak(model_device(model), dtype)
    result["train"] = train
    result["generation"] = []
    if config.gen_tokens:
        progress.set_description(f"{name}: generate")
        for use_cache in (True, False):
            result["generation"].append(time_generation(model, config.gen_tokens, use_cache, config.gen_repeats,
                                                        config.seed, token_bytes))
    return result


# ----------------------------------------------------------------------------
# reporting

def environment(device, dtype):
    threads = torch.get_num_threads() if device.type == "cpu" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
            "threads": threads, "cpu_count": os.cpu_count()}


def cell(entry):
    return MISSING if entry is None else f"{entry['median_ms']:.2f} ({entry['p10_ms']:.2f}-{entry['p90_ms']:.2f})"


def markdown_tables(report, sweep):
    """The report as markdown: latency, throughput and time split, each with the environment line."""
    env = report["environment"]
    lines = [f"device {env['device']} ({env['device_name']}), torch {env['torch']}, {env['dtype']}, "
             f"threads {env['threads']}, matmul peak {env['matmul_peak_gflops']:.0f} GFLOP/s, "
             f"load average {env['load_average_1min']:.1f} on {env['cpu_count']} cores at the end; "
             f"ms as median (p10-p90); {MISSING} = longer than the model's block_size", ""]

    def table(header, rows):
        lines.extend(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        lines.append("")

    models = report["models"]
    seq_lens, context_lens = sweep["seq_lens"], sweep["context_lens"]
    for batch in sweep["batch_sizes"]:
        lines.append(f"Prefill latency, batch {batch} (ms; head on the last position only)")
        find = lambda m, t: next((p for p in m["prefill"] if p["batch_size"] == batch and p["seq_len"] == t), None)
        table(["model", "params", *[f"T={t}" for t in seq_lens]],
              [[m["name"], f"{m['params']['total'] / 1e6:.2f}M", *[cell(find(m, t)) for t in seq_lens]] for m in models])
    lines.append("Decode latency per token with the KV cache (ms; context = cached positions + the new token)")
    find = lambda m, t: next((d for d in m["decode"] if d["context_len"] == t), None)
    table(["model", *[f"ctx={t}" for t in context_lens]], [[m["name"], *[cell(find(m, t)) for t in context_lens]] for m in models])

    lines.append("Throughput: a training step (forward, backward, AdamW) and generation through generate_stream")
    rows = []
    for m in models:
        train, gen = m["train"], {g["use_cache"]: g for g in m["generation"]}
        cached, recompute = gen.get(True), gen.get(False)
        rate = lambda g, key="tokens_per_s": MISSING if g is None or g[key] is None else f"{g[key]:,.0f}"
        speedup = f"{cached['tokens_per_s'] / recompute['tokens_per_s']:.1f}x" if cached and recompute else MISSING
        rows.append([m["name"], f"{train['batch_size']}x{train['seq_len']}", f"{train['tokens_per_s']:,.0f}",
                     f"{train['flops_per_token'] / 1e6:.1f}M", f"{100 * train['mfu']:.1f}%",
                     rate(cached), rate(recompute), speedup, rate(cached, "bytes_per_s")])
    table(["model", "train batch", "train tok/s", "FLOPs/token", "MFU", "gen tok/s (cache)",
           "gen tok/s (no cache)", "speedup", "gen bytes/s (cache)"], rows)

    lines.append("Where prefill time goes (batch 1; shares from module hooks; last column: 1 - t(no FFN) / t)")
    categories = ("embedding", "attention", "ffn", "norm", "head", "other")
    rows = [[m["name"], s["seq_len"], f"{s['prefill_ms']:.2f}", *[f"{100 * s['shares'].get(c, 0):.0f}%" for c in categories],
             f"{100 * s['ffn_share_removed']:.0f}%"] for m in models for s in m["split"]]
    table(["model", "T", "ms", *categories, "FFN (removed)"], rows)
    return "\n".join(lines)


def plot(report, path):
    """Prefill latency against sequence length, one line per model; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in report["models"]:
        points = [(p["seq_len"], p["median_ms"]) for p in m["prefill"] if p["batch_size"] == 1]
        if points:
            ax.plot(*zip(*points), marker="o", label=m["name"])
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="prefill latency, batch 1 (ms)",
           title=f"{report['environment']['device']}, {report['environment']['dtype']}")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------

def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but torch sees no CUDA GPU: use --device=cpu")
    return torch.device(name)


def main(argv=None):
    config, model_args = BenchConfig(), GPTConfig()
    assigned = parse_config([config, model_args], sys.argv[1:] if argv is None else argv, usage=__doc__)
    model_keys = {f.name for f in dataclasses.fields(GPTConfig)}
    model_overrides = {k: v for k, v in assigned.items() if k in model_keys}
    if config.dtype not in DTYPES:
        raise UserError(f"--dtype={config.dtype} is not one of {', '.join(DTYPES)}")
    dtype, device = DTYPES[config.dtype], pick_device(config.device)
    if config.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda_graphs needs --device=cuda")
    if device.type == "cpu":
        torch.set_num_threads(config.threads or os.cpu_count())
        if os.getloadavg()[0] > BUSY_LOAD:
            # threads waiting on a descheduled sibling make small ops 10-100x slower: the numbers would be noise
            print(f"warning: load average {os.getloadavg()[0]:.1f}: other processes are using the CPU, "
                  f"timings will be noisy (run under flock or on an idle machine)", file=sys.stderr)
    if config.ingredients:
        names = list(INGREDIENTS) if config.ingredients == "all" else parse_list(config.ingredients, str, "ingredients")
        unknown = [n for n in names if n not in INGREDIENTS]
        if unknown:
            raise UserError(f"--ingredients: unknown {unknown[0]!r}; choose from all, {', '.join(INGREDIENTS)}")
        seq_len = config.train_len or preset_config("cpu-tiny").block_size
        timings = time_ingredients(names, config.train_batch, seq_len, config.repeats)
        print(environment(device, dtype))
        print(ingredient_table(timings, config.train_batch, seq_len))
        return
    sweep = parse_sweep(config)
    torch.manual_seed(config.seed)
    variants = build_variants(config, model_overrides, dtype, device)
    report = {"environment": environment(device, dtype), "bench_config": dataclasses.asdict(config), "models": []}
    t0 = time.perf_counter()
    progress = tqdm(variants, unit="model", dynamic_ncols=True, file=sys.stderr)
    for name, model, tokenization, token_bytes in progress:
        report["models"].append(bench_model(name, model, tokenization, token_bytes, config, sweep, dtype, progress))
    report["seconds"] = time.perf_counter() - t0
    # a peak is a maximum: another process can only lower a measurement of it, so the run's best one is the denominator
    peak = max(m["train"]["matmul_peak_flops"] for m in report["models"])
    report["environment"]["matmul_peak_gflops"] = peak / 1e9
    for m in report["models"]:
        m["train"]["mfu"] = m["train"]["tokens_per_s"] * m["train"]["flops_per_token"] / peak
    # this run's own threads make about `threads` of it: much more means other processes shared the CPU (noise)
    report["environment"]["load_average_1min"] = os.getloadavg()[0]
    print(markdown_tables(report, sweep))
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    png = plot(report, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {png}" if png else " (pip install matplotlib for a plot)")
          + f"; measured in {report['seconds']:.0f} s")


if __name__ == "__main__":
    run(main)
