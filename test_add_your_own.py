"""The README's "Add your own method" recipe, run: a complete new attention method in ~40 lines.

StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv
2309.17453): each decode query reads the first tokens (the attention sinks, which soak up attention
mass whatever the text) and a window of the most recent ones. Here at page granularity, so that the
paged decode kernel serves it: the first `sinks` pages and the `recent` newest pages. Prefill is dense.

The method follows attention.py's protocol: prefill with host positions, one decode step with device
positions that writes the cache in place, statistics as device counters. So it runs in
generate.generate's loop, with the Triton kernels or the references, and under --cuda-graph.
"""

import pytest
import torch

import kernels
from attention import DenseAttention, attention_ref, paged_decode_ref, prefill_attention
from conftest import DEVICE, ON_GPU, tiny_model
from generate import generate
from kvcache import KVCache


class StreamingAttention:
    prefill_rows = 0  # decoding needs nothing of the prompt but its cache

    def __init__(self, cache, sinks=1, recent=4, use_kernels=False):
        self.cache, self.sinks, self.recent, self.use_kernels = cache, sinks, recent, use_kernels
        self.sink_pages = torch.arange(sinks, device=cache.k.device)

    def prefill(self, layer_idx, q, k, v, input_pos):  # dense and causal, as DenseAttention's
        self.cache.write(layer_idx, k, v, input_pos)
        return prefill_attention(q, self.cache.k[layer_idx], self.cache.v[layer_idx], input_pos, self.use_kernels)[0]

    def decode(self, layer_idx, q, k, v, input_pos):
        S, B = self.cache.page_size, q.shape[0]
        seq_len = self.cache.append(layer_idx, k, v, input_pos, self.use_kernels)  # (1,) int32, on the device
        newest = (seq_len.long() - 1) // S
        recent = newest - torch.arange(self.recent, device=q.device)  # the newest page and those before it
        pages = torch.cat([self.sink_pages, torch.where(recent >= self.sinks, recent, -1)])  # each once; -1: none
        attend = kernels.paged_decode if self.use_kernels else paged_decode_ref
        page_idx = pages.to(torch.int32).expand(B, self.cache.k.shape[2], -1)
        o, _ = attend(q[:, 0], self.cache.k[layer_idx], self.cache.v[layer_idx], page_idx, seq_len, S)
        return o.unsqueeze(1)

    def record_prefill(self, layer_idx, input_pos, o, lse):
        pass

    @property
    def stats(self):  # from the lengths the cache logged: the keys of the listed pages before n, in every layer
        n, steps = self.cache.decoded_lengths()
        S = self.cache.page_size
        first_recent = (((n - 1) // S - self.recent + 1) * S).clamp(min=self.sinks * S)
        rows = n.clamp(max=self.sinks * S) + (n - first_recent).clamp(min=0)
        return {"kv_bytes_read": int((steps * rows).sum()) * self.cache.row_bytes() * self.cache.k.shape[0],
                "decode_steps": int(steps.sum())}


# ------------------------------------------------------------------------------------------------
# The recipe's checks

def setup(n_prompt=30, n_new=10, seed=1):
    model = tiny_model(seed=seed)
    prompt = torch.randint(0, 300, (1, n_prompt), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    a = model.args
    return model, prompt, lambda: KVCache(a.n_layers, 1, a.n_kv_heads, n_prompt + n_new, a.head_dim, torch.float32,
                                          DEVICE, page_size=4, page_meta=False)


def test_a_window_covering_everything_gives_the_dense_greedy_tokens():
    model, prompt, cache = setup()
    dense = generate(model, DenseAttention(cache()), prompt, 10)[0]
    streaming = StreamingAttention(cache(), sinks=1, recent=10)  # 11 pages of 4 >= 40 tokens
    assert torch.equal(generate(model, streaming, prompt, 10)[0], dense)
    assert streaming.stats["kv_bytes_read"] == sum(range(31, 40)) * cache().row_bytes() * model.args.n_layers


def test_a_decode_step_reads_exactly_the_sink_and_recent_pages():
    """One layer, a fixed stream: the output is attention over the keys of page 0 and the two newest
    pages (positions 0-3 and 20-26 for a sequence of 27), which differs from dense attention."""
    B, Hq, Hkv, D, n = 1, 4, 2, 8, 27
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, h, D, generator=g).to(DEVICE) for h in (Hq, Hkv, Hkv))
    attn = StreamingAttention(KVCache(1, B, Hkv, 32, D, torch.float32, DEVICE, page_size=4), sinks=1, recent=2)
    attn.prefill(0, q[:, :n - 1], k[:, :n - 1], v[:, :n - 1], torch.arange(n - 1))
    o = attn.decode(0, q[:, -1:], k[:, -1:], v[:, -1:], torch.tensor([n - 1], device=DEVICE))
    keys = torch.tensor([0, 1, 2, 3] + list(range(20, 27)), device=DEVICE)
    expect, _ = attention_ref(q[:, -1:].transpose(1, 2), k[:, keys].transpose(1, 2), v[:, keys].transpose(1, 2),
                              causal=False)
    torch.testing.assert_close(o.transpose(1, 2), expect)
    dense, _ = attention_ref(q[:, -1:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
    assert not torch.allclose(o.transpose(1, 2), dense, atol=1e-3)
    assert attn.stats["kv_bytes_read"] == 11 * attn.cache.row_bytes()


def test_the_kernels_give_the_reference_tokens():
    model, prompt, cache = setup(n_prompt=26, n_new=6, seed=2)
    ref = generate(model, StreamingAttention(cache(), sinks=1, recent=2), prompt, 6)[0]
    assert torch.equal(generate(model, StreamingAttention(cache(), sinks=1, recent=2, use_kernels=True), prompt, 6)[0], ref)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")
def test_a_captured_decode_step_gives_the_eager_tokens():
    model, prompt, cache = setup(n_prompt=200, n_new=40)
    eager = generate(model, StreamingAttention(cache(), sinks=2, recent=8, use_kernels=True), prompt, 40)[0]
    graph = generate(model, StreamingAttention(cache(), sinks=2, recent=8, use_kernels=True), prompt, 40,
                     cuda_graph=True)[0]
    assert torch.equal(graph, eager)
