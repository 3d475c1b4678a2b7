"""
Generating text with a trained model: the KV cache, sampling, and the loop.

    tokens = generation.generate(model, prompt, 200, temperature=0.8, top_k=200)
    for token in generation.generate_stream(model, prompt, 200): ...   # one at a time

(`model.generate` and `model.generate_stream` call these.) The loop runs the
model's core through `model.hidden_states`, which fills a `KVCache` so each new
token costs one position's work, and `model.next_token`, which turns the last
hidden state into a sampled token (or a pooled model's chunk) with
`sample_next`: temperature, top-k and nucleus (top-p) sampling. On a CPU most of
a token's time is Python launching ~570 small ops; `compile=True` runs each
one-token step through one torch.compile'd graph instead (`static_step`).
"""

import torch


class KVCache:
    """
    Keys and values of every position seen so far, one slot per block
    application, preallocated for the whole context so decoding never copies.
    """

    def __init__(self, config, batch_size, device, dtype):
        n_slots = config.n_layer * config.block_repeat
        shape = (n_slots, batch_size, config.kv_heads, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already stored
        # a one-token step at a position held in a tensor (static_step): the same shapes at
        # every position, so torch.compile builds one graph for all of them
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(1, config.block_size, dtype=torch.bool, device=device)
        self._slots = torch.arange(config.block_size, device=device)

    def begin_static_step(self):
        """Point the static step at the next free position; the caller then calls static_step once."""
        self.position.fill_(self.length)
        torch.le(self._slots, self.length, out=self.visible[0])

    def store(self, slot, k, v):
        """Append this step's keys/values for one slot; return all of them so far."""
        end = self.length + k.size(2)
        self.k[slot, :, :, self.length:end] = k
        self.v[slot, :, :, self.length:end] = v
        return self.k[slot, :, :, :end], self.v[slot, :, :, :end]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, vocab). temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus sampling: keep the most likely tokens whose mass reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        beyond_nucleus = mass_before >= top_p
        beyond_nucleus[:, 0] = False  # the likeliest token always stays, even at top_p=0
        sorted_logits = sorted_logits.masked_fill(beyond_nucleus, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


def compiled_static_step(model):
    """model.static_step compiled for fixed shapes (one per model: torch reuses it across calls)."""
    if getattr(model, "_compiled_static_step", None) is None:
        model._compiled_static_step = torch.compile(model.static_step, dynamic=False, fullgraph=True)
    return model._compiled_static_step


@torch.inference_mode()
def generate_stream(model, idx, max_new_tokens, use_cache=True, compile=False, **sampling):
    """
    Yield sampled tokens one at a time, (B, 1) each, continuing the prompt idx
    (B, T); a pooled model yields chunks (B, 1, max_chunk_bytes) continuing
    prompt chunks (B, T, max_chunk_bytes). sampling: model.next_token's keywords.

    The model sees at most block_size tokens, and the two modes window them
    differently, so their samples part ways once the context is full:
    - use_cache=False is nanoGPT's sliding window: every new token
      recomputes the whole forward pass over the last block_size tokens.
    - use_cache=True costs one position's work per token. A cache cannot
      slide: learned positions would shift, and each layer's keys depend on
      every earlier token of the window. So when the window is full, the
      cache is refilled from its newest half (one prefill every
      block_size / 2 tokens), and the model sees between block_size / 2
      and block_size tokens. compile=True runs each one-token step through
      a torch.compile'd static_step: several times faster per token, after
      a compilation of tens of seconds (torch caches it on disk for later runs).
    """
    block_size = model.config.block_size
    if not use_cache:
        for _ in range(max_new_tokens):
            idx = idx[:, -block_size:]
            token = model.next_token(model.hidden_states(idx)[:, -1], **sampling)
            yield token
            idx = torch.cat([idx, token], dim=1)
        return
    keep = block_size - block_size // 2  # tokens kept when the window is full
    window = idx[:, -block_size:]  # the tokens the model conditions on
    cache = KVCache(model.config, idx.size(0), idx.device, model.ln_f.weight.dtype)
    unseen = window  # tokens the cache has not seen yet
    step = compiled_static_step(model) if compile and model.config.embedder == "tokens" else None
    for _ in range(max_new_tokens):
        if step is not None and unseen.size(1) == 1 and cache.length > 0:  # a sampled token: the prompt stays eager
            cache.begin_static_step()
            h = step(unseen, cache)
            cache.length += 1
        else:  # the prompt, a refill, or no compiled step
            h = model.hidden_states(unseen, cache)[:, -1]
        token = model.next_token(h, **sampling)
        yield token
        window, unseen = torch.cat([window, token], dim=1), token
        if window.size(1) > block_size:  # full: refill the cache from the newest half
            window = unseen = window[:, -keep:]
            cache.length = 0


def generate(model, idx, max_new_tokens, **sampling):
    """The prompt followed by max_new_tokens sampled tokens, as one (B, T + new) tensor."""
    new = list(generate_stream(model, idx, max_new_tokens, **sampling))
    return torch.cat([idx, *new], dim=1)
