"""
Latency and throughput benchmark: how fast is a super tiny model, and where
does its time go?

    python bench.py                                     # the quick default: cpu-tiny and stlm-10m
    python bench.py --presets=cpu-tiny,stlm-10m,stlm-50m --seq_lens=1,16,64,128 --threads=2
    python bench.py --ckpts=out/ckpt.pt,out/ckpt_merged.pt   # checkpoints side by side (reparam.py merges)
    python bench.py --ffns=swiglu,rep_linear            # FFN types side by side, a rep_* one merged beside it
    python bench.py --vocab_size=50257                  # GPT-2's vocabulary instead of 256 bytes
    python bench.py --device=cuda --dtype=bfloat16 --cuda_graphs
    python bench.py --help                              # every key; GPTConfig keys (--n_layer=6) override the presets

For every model:
- prefill latency (batch 1, the head on the last position only: what the
  first token costs) and where it goes: the FFN's share, 1 - t(FFNs removed) / t,
  and on a CPU the time inside each kind of module, from forward hooks reading
  the wall clock (on a GPU, where kernels run asynchronously, a hook would
  time kernel launches, so none is used);
- decode latency per token with the KV cache, at a given context length;
- generation tokens/s through model.generate_stream, with the cache and
  without it: then, as in nanoGPT's sample.py, the last block_size tokens are
  recomputed for every new token;
- training tokens/s of a full step (forward, backward, clipping, train.py's
  default optimizers: Muon for the core's matrices, AdamW for the rest) and
  the model FLOPs utilisation (MFU) against a matmul peak measured next to it.

Latencies are medians (with p10/p90) of many calls after warm-up calls, on a
fixed thread count; on CUDA float32 multiplies in TF32, as train.py trains.
Tables name the device, torch version, dtype, threads and load average, and
every number also goes to a JSON file (most of the default run is stlm-10m
generating without the cache). Pooled byte models are not benchmarked yet.
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

import hardware
import reparam
import train
from cli import UserError, parse_config, run
from generation import KVCache
from model import GPT, GPTConfig, load_checkpoint, model_from_checkpoint, preset_config
from tokenizer import BYTE_VOCAB, token_byte_table


@dataclass
class BenchConfig:
    # what to measure
    presets: str = "cpu-tiny,stlm-10m"  # comma-separated names from model.py; skipped if only --ckpts is given
    ckpts: str = ""  # comma-separated checkpoint paths, benchmarked as trained
    ffns: str = ""  # comma-separated FFN types to run each preset with; "" = the preset's own
    # the sweep; lengths beyond a model's block_size are skipped and shown as "-"
    seq_lens: str = "1,16,64"  # prefill lengths (and where the time goes at each)
    context_lens: str = "1,16,64"  # decode: positions the new token attends to (itself + the cache)
    gen_tokens: int = 200  # tokens generated with and without the cache (0 skips generation)
    train_batch: int = 12  # training step: nanoGPT's CPU batch...
    train_len: int = 64  # ...and context; 0 = each model's block_size
    # timing
    repeats: int = 30  # timed calls per measurement (the median and p10/p90 are over these)
    warmup: int = 5  # untimed calls first: allocator, caches, lazy initialisation
    train_repeats: int = 3  # training steps are slow: fewer of them
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 | float16 (training autocasts to it)
    threads: int = 0  # CPU threads for torch; 0 = every core
    cuda_graphs: bool = False  # replay prefill/decode as CUDA graphs (one launch instead of hundreds)
    seed: int = 0
    out: str = "out-bench/bench.json"  # the JSON report


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PERCENTILES = (10, 90)  # the spread reported around each median
# matmul peak: square sizes tried (the best wins): big enough to saturate the device, small enough to be quick
PEAK_SIZES = {"cpu": (256, 512, 1024), "cuda": (2048, 4096, 8192)}
PEAK_REPEATS = 10
TRAIN_WARMUP = 1  # untimed training steps: the optimizers allocate their state in the first
GEN_WARMUP_TOKENS = 16  # a short untimed generation first: the allocator, lazy kernels
GEN_TEMPERATURE, GEN_TOP_K = 0.8, 200  # nanoGPT sample.py's defaults, so the baseline matches its work
SPLIT_CATEGORIES = ("embedding", "attention", "ffn", "norm", "head", "other")
MISSING = "-"  # a table cell not measured: longer than the model's block_size, or hooks on a GPU


# ----------------------------------------------------------------------------
# timing

def summarize_ms(samples_ms):
    """Median and p10/p90 of timings in milliseconds (nearest-rank percentiles)."""
    ordered = sorted(samples_ms)
    rank = lambda q: ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered), "p10_ms": rank(PERCENTILES[0]), "p90_ms": rank(PERCENTILES[1])}


def cuda_graphed(fn, device):
    """
    fn captured as a CUDA graph: the result replays its kernels in one launch and returns the
    output they write. fn must do the same work on the same tensors every call.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the main stream, as torch.cuda.graph requires
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
    sync = partial(torch.cuda.synchronize, device) if torch.device(device).type == "cuda" else lambda: None
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
    """Prefill latency: hidden states of a (1, seq_len) prompt and the head on its last position only."""
    device = next(model.parameters()).device
    idx = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    return time_fn(torch.inference_mode()(partial(last_logits, model, idx)), repeats, warmup, device, cuda_graphs)


def time_decode(model, context_len, repeats=30, warmup=5, cuda_graphs=False):
    """
    One cached decode step whose new token attends to context_len positions (context_len - 1
    cached, plus itself); the cache is rewound before every call, so each decodes the same position.
    """
    config, device = model.config, next(model.parameters()).device
    with torch.inference_mode():
        cache = KVCache(config, 1, device, next(model.parameters()).dtype)
        prompt = torch.randint(0, config.vocab_size, (1, context_len), device=device)
        if context_len > 1:
            model.hidden_states(prompt[:, :-1], cache)

    @torch.inference_mode()
    def decode():
        cache.length = context_len - 1
        return last_logits(model, prompt[:, -1:], cache)

    return time_fn(decode, repeats, warmup, device, cuda_graphs)


def time_generation(model, n_tokens, use_cache, seed=0, token_bytes=None):
    """
    Tokens/s of model.generate_stream from a one-token prompt, each token read
    back to the host as a streaming sampler must; with token_bytes (bytes of
    text per token id) also bytes/s. use_cache=False is nanoGPT's sliding window.
    """
    device = next(model.parameters()).device
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    sample = partial(model.generate_stream, prompt, temperature=GEN_TEMPERATURE, top_k=GEN_TOP_K,
                     use_cache=use_cache, generator=generator)
    for _ in sample(GEN_WARMUP_TOKENS):
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
    applications = config.n_layer * config.block_repeat
    return 6 * matmul_params(model) + 12 * applications * config.n_embd * seq_len


def matmul_peak(device, dtype, repeats=PEAK_REPEATS):
    """The best FLOP/s of a square matmul on this device, dtype and thread count: MFU's denominator."""
    best = 0.0
    for n in PEAK_SIZES[device.type]:
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
    optimizer = train.make_optimizer(model, train_config, str(device))
    x, y = (torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device) for _ in range(2))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # before this step's update
    return step


def time_train_step(model, batch_size, seq_len, dtype, repeats=3):
    """Median ms and tokens/s of a training step with train.py's default recipe, on fp32 master weights as it keeps them."""
    step = training_step(copy.deepcopy(model).float().train(), train.TrainConfig(), batch_size, seq_len, dtype)
    timing = time_fn(step, repeats, TRAIN_WARMUP, next(model.parameters()).device)
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
    pairs = [(model.wte, "embedding"), (model.wpe, "embedding"), (model.ln_f, "head"), (model.lm_head, "head")]
    for block in model.h:
        pairs += [(block.ln_1, "norm"), (block.attn, "attention"), (block.ln_2, "norm"), (block.mlp, "ffn")]

    def stop(category, module, args, output):
        totals_ms[category] = totals_ms.get(category, 0.0) + 1000 * (time.perf_counter() - started.pop())

    for module, category in {id(m): (m, c) for m, c in pairs if m is not None}.values():
        handles.append(module.register_forward_pre_hook(lambda module, args: started.append(time.perf_counter())))
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
    ffns = [block.mlp for block in model.h]
    try:
        for block in model.h:
            block.mlp = nn.Identity()
        without_ffn = time_prefill(model, seq_len, repeats, warmup, cuda_graphs)["median_ms"]
    finally:
        for block, ffn in zip(model.h, ffns):
            block.mlp = ffn
    result = {"without_ffn_ms": without_ffn, "ffn_share_removed": 1 - without_ffn / prefill_ms, "module_ms": None}
    if next(model.parameters()).device.type != "cpu":
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
        raise UserError(f"--{key} expects a comma-separated list of {kind.__name__}, got {text!r}") from None
    if kind is int and any(v < 1 for v in values):
        raise UserError(f"--{key} values must be at least 1, got {text}")
    return values


def merged_variant(model):
    """The merged (inference) form of a model whose reparameterizable FFN is not merged yet, else None."""
    if model.config.ffn not in reparam.MERGEABLE or model.config.ffn_merged:
        return None
    # an untrained rep_anneal is timed at the end of its schedule, the form it merges from
    return reparam.reparameterize(reparam.complete_anneal(copy.deepcopy(model)))


def build_variants(config, presets, model_overrides, dtype, device):
    """
    [(name, model, bytes of text per token id or None)]: every preset with every FFN type, a rep_*
    one followed by its merged form, then every checkpoint as it is (reparam.py merges a trained one).
    """
    variants = []  # (name, model, tokenization or None)
    for preset in presets:
        for ffn in parse_list(config.ffns, str, "ffns") or [None]:
            torch.manual_seed(config.seed)
            model = GPT(preset_config(preset, **{**model_overrides, **({"ffn": ffn} if ffn else {})})).eval()
            # random weights: bytes/s means something for a byte model only, where it equals tokens/s
            tokenization = "bytes" if model.config.vocab_size == BYTE_VOCAB else None
            name = f"{preset}/{ffn}" if ffn else preset
            variants.append((name, model, tokenization))
            if (merged := merged_variant(model)) is not None:
                variants.append((f"{name} merged", merged, tokenization))
    for path in parse_list(config.ckpts, str, "ckpts"):
        checkpoint = load_checkpoint(path)
        tokenization = checkpoint.get("data_meta", {}).get("tokenization", "bytes")
        variants.append((path, model_from_checkpoint(checkpoint), tokenization))
    if not variants:
        raise UserError("nothing to benchmark: pass --presets=NAMES or --ckpts=PATHS")
    for name, model, _ in variants:
        if model.config.embedder == "pooled":
            raise UserError(f"{name} is a pooled byte model: bench.py does not benchmark those yet")
    bytes_per_token = lambda tokenization: tokenization and [len(b) for b in token_byte_table(tokenization)]
    return [(name, model.to(device=device, dtype=dtype), bytes_per_token(tokenization)) for name, model, tokenization in variants]


# ----------------------------------------------------------------------------
# one model, every measurement

def bench_model(name, model, token_bytes, config, dtype, progress):
    """Every measurement of one model, as a JSON-ready dict; MFU is added by main once the run's peak is known."""
    block_size = model.config.block_size
    fits = lambda key: [n for n in parse_list(getattr(config, key), int, key) if n <= block_size]
    timing = dict(repeats=config.repeats, warmup=config.warmup, cuda_graphs=config.cuda_graphs)
    result = {"name": name, "config": dataclasses.asdict(model.config), "params": model.num_params(),
              "matmul_params": matmul_params(model)}
    progress.set_description(f"{name}: prefill")
    result["prefill"] = []
    for t in fits("seq_lens"):
        full = time_prefill(model, t, **timing)
        result["prefill"].append({"seq_len": t, **full, **time_split(model, t, full["median_ms"], **timing)})
    progress.set_description(f"{name}: decode")
    result["decode"] = [{"context_len": t, **time_decode(model, t, **timing)} for t in fits("context_lens")]
    progress.set_description(f"{name}: train")
    train_len = min(config.train_len or block_size, block_size)
    # the matmul peak next to the training step it divides, so both see the same machine state
    result["train"] = {**time_train_step(model, config.train_batch, train_len, dtype, config.train_repeats),
                       "flops_per_token": train_flops_per_token(model, train_len),
                       "matmul_peak_flops": matmul_peak(next(model.parameters()).device, dtype)}
    progress.set_description(f"{name}: generate")
    result["generation"] = [time_generation(model, config.gen_tokens, use_cache, config.seed, token_bytes)
                            for use_cache in (True, False) if config.gen_tokens]
    return result


# ----------------------------------------------------------------------------
# reporting

def environment(device, dtype):
    cuda = device.type == "cuda"
    tf32 = cuda and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else platform.machine(),
            "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch.") + (" (TF32 matmuls)" if tf32 else ""),
            "threads": None if cuda else torch.get_num_threads(), "cpu_count": os.cpu_count()}


def cell(entries, key, value):
    entry = next((e for e in entries if e[key] == value), None)
    return MISSING if entry is None else f"{entry['median_ms']:.2f} ({entry['p10_ms']:.2f}-{entry['p90_ms']:.2f})"


def markdown_tables(report):
    """The report as markdown: latency, throughput and time split, under the environment line."""
    env, models, config = report["environment"], report["models"], report["bench_config"]
    lines = [f"device {env['device']} ({env['device_name']}), torch {env['torch']}, {env['dtype']}, "
             f"threads {env['threads']}, matmul peak {env['matmul_peak_gflops']:.0f} GFLOP/s, "
             f"load average {env['load_average_1min']:.1f} on {env['cpu_count']} cores at the end "
             f"(much above the threads: other processes shared the CPU); ms as median (p10-p90)", ""]

    def table(title, header, rows):
        lines.extend([title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        lines.append("")

    seq_lens, context_lens = (parse_list(config[key], int, key) for key in ("seq_lens", "context_lens"))
    table("Prefill latency, batch 1 (ms; head on the last position only)", ["model", "params", *[f"T={t}" for t in seq_lens]],
          [[m["name"], f"{m['params']['total'] / 1e6:.2f}M", *[cell(m["prefill"], "seq_len", t) for t in seq_lens]]
           for m in models])
    table("Decode latency per token with the KV cache (ms; context = cached positions + the new token)",
          ["model", *[f"ctx={t}" for t in context_lens]],
          [[m["name"], *[cell(m["decode"], "context_len", t) for t in context_lens]] for m in models])
    rows = []
    for m in models:
        step, gen = m["train"], {g["use_cache"]: g for g in m["generation"]}
        rate = lambda g, key="tokens_per_s": MISSING if g is None or g[key] is None else f"{g[key]:,.0f}"
        speedup = f"{gen[True]['tokens_per_s'] / gen[False]['tokens_per_s']:.1f}x" if gen else MISSING
        rows.append([m["name"], f"{step['batch_size']}x{step['seq_len']}", f"{step['tokens_per_s']:,.0f}",
                     f"{step['flops_per_token'] / 1e6:.1f}M", f"{100 * step['mfu']:.1f}%",
                     rate(gen.get(True)), rate(gen.get(False)), speedup, rate(gen.get(True), "bytes_per_s")])
    table("Throughput: a training step (forward, backward, train.py's optimizers); generation through generate_stream "
          "(no cache: nanoGPT's window of block_size tokens recomputed for every token)",
          ["model", "train batch", "train tok/s", "FLOPs/token", "MFU", "gen tok/s (cache)", "gen tok/s (no cache)",
           "speedup", "gen bytes/s (cache)"], rows)
    rows = []
    for m in models:
        for p in m["prefill"]:
            hooked = p["module_ms"] and sum(p["module_ms"].values())
            share = lambda c: MISSING if not hooked else f"{100 * p['module_ms'].get(c, 0) / hooked:.0f}%"
            rows.append([m["name"], p["seq_len"], f"{p['median_ms']:.2f}", *map(share, SPLIT_CATEGORIES),
                         f"{100 * p['ffn_share_removed']:.0f}%"])
    table("Where prefill time goes (shares of the time inside modules, from hooks, CPU only; "
          "last column: 1 - t(no FFN) / t)", ["model", "T", "ms", *SPLIT_CATEGORIES, "FFN (removed)"], rows)
    return "\n".join(lines)


# ----------------------------------------------------------------------------

def main(argv=None):
    config, model_args = BenchConfig(), GPTConfig()
    assigned = parse_config([config, model_args], sys.argv[1:] if argv is None else argv, usage=__doc__)
    model_keys = {f.name for f in dataclasses.fields(GPTConfig)}
    model_overrides = {k: v for k, v in assigned.items() if k in model_keys}
    if config.dtype not in DTYPES:
        raise UserError(f"--dtype={config.dtype} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[config.dtype]
    device = torch.device(hardware.pick_device(config.device))
    if config.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda_graphs needs --device=cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py trains: float32 matmuls in TF32
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(config.threads or os.cpu_count())
    # checkpoints alone when only they are named: `--ckpts=a,b` compares a and b
    presets = parse_list(config.presets, str, "presets") if "presets" in assigned or not config.ckpts else []
    variants = build_variants(config, presets, model_overrides, dtype, device)
    report = {"environment": environment(device, dtype), "bench_config": dataclasses.asdict(config), "models": []}
    t0 = time.perf_counter()
    progress = tqdm(variants, unit="model", dynamic_ncols=True, file=sys.stderr)
    for name, model, token_bytes in progress:
        report["models"].append(bench_model(name, model, token_bytes, config, dtype, progress))
    report["seconds"] = time.perf_counter() - t0
    # a peak is a maximum: another process can only lower a measurement of it, so the run's best one is the denominator
    peak = max(m["train"]["matmul_peak_flops"] for m in report["models"])
    report["environment"]["matmul_peak_gflops"] = peak / 1e9
    for m in report["models"]:
        m["train"]["mfu"] = m["train"]["tokens_per_s"] * m["train"]["flops_per_token"] / peak
    report["environment"]["load_average_1min"] = os.getloadavg()[0]
    print(markdown_tables(report))
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}; measured in {report['seconds']:.0f} s")


if __name__ == "__main__":
    run(main)
