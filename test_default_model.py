"""The committed default model: it loads, it decodes as it was trained, it recalls, and every method
at full budget reproduces its dense greedy tokens (the exactness anchor of the whole project)."""

from pathlib import Path

import numpy as np
import pytest
import torch

import train
from attention import DenseAttention
from checkpoint import load_model
from compaction import REPEAT_PROMPT, compact_prompt
from generate import DEFAULT_CHECKPOINT, generate
from kvcache import KVCache, QuestAttention
from tokenizer import Tokenizer
from retro import RetroAttention
from token_sparse import TokenSparseAttention

N_NEW = 16


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    """400 tokens of a held-out standard library file (never trained on)."""
    _, heldout = train.split_files(train.load_source_files(train.stdlib_dir()))
    text = max((t for _, t in heldout), key=len)
    return torch.tensor([tokenizer.encode(text)[:400]])


def new_cache(model, n):
    a = model.args
    return KVCache(a.n_layers, 1, a.n_kv_heads, n, a.head_dim, torch.float32, "cpu", page_size=16)


def test_checkpoint_loads_and_tokenizer_round_trips(model, tokenizer):
    assert model.args.max_seq_len >= 4096 and 5e6 <= sum(p.numel() for p in model.parameters()) <= 10e6
    assert sum(f.stat().st_size for f in Path(DEFAULT_CHECKPOINT).iterdir()) <= 20 * 2**20
    text = 'def f(x):\n    return {"naïve": x ** 2}  # 東京\n\n\tpass\r\n'
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_cached_greedy_decoding_equals_full_forward(model, prompt):
    # the decode path (KV cache, one token a step) must agree with recomputing everything: if dense
    # decoding drifts (cache, RoPE positions, kernels), this fails
    out, _ = generate(model, DenseAttention(new_cache(model, prompt.shape[1] + N_NEW)), prompt, N_NEW)
    seq = prompt
    for _ in range(N_NEW):
        seq = torch.cat([seq, model(seq, last_only=True)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, prompt.shape[1]:])


def test_recall_accuracy_is_above_the_floor(model, tokenizer):
    # 8 fixed lookups at 1K tokens of held-out code from the table; the model card reports 100% there
    _, heldout = train.split_files(train.load_source_files(train.stdlib_dir()))
    stream = train.tokenize_files(tokenizer.enc, heldout, tokenizer.special_tokens[train.EOT])
    suite = train.recall_suite(stream, tokenizer.enc.encode_ordinary, (1024,), n_per_distance=8, n_pairs=16)
    hits = 0
    for _, ids, lk in suite:
        x = torch.from_numpy(ids[:lk.pos].astype(np.int64))[None]
        new, _ = generate(model, DenseAttention(new_cache(model, lk.pos + lk.n_tokens)), x, lk.n_tokens)
        hits += tokenizer.decode(new[0].tolist()).startswith(lk.value + '"')
    assert hits >= 7, f"recall {hits}/8 at 1K tokens (floor 7/8)"


@pytest.mark.parametrize("method", ["quest", "retro w=2", "retro w=4", "token_sparse", "token_sparse+retro",
                                    "compact"])
def test_full_budget_gives_the_dense_greedy_tokens(model, tokenizer, prompt, method):
    n = prompt.shape[1] + N_NEW
    dense, _ = generate(model, DenseAttention(new_cache(model, n)), prompt, N_NEW)
    start = 0
    budget = 16 * -(-n // 16)  # every page
    if method == "quest":
        attn, window = QuestAttention(new_cache(model, n), budget, 16, dense_layers=0), 1
    elif method.startswith("retro"):
        window = int(method.split("=")[1])
        attn = RetroAttention(new_cache(model, n), budget, 16, window=window, dense_layers=0)
    elif method == "token_sparse":  # coverage 0 drops nothing: the selection runs and keeps every token
        cache = new_cache(model, n)
        attn, window = TokenSparseAttention(cache, DenseAttention(cache), coverage=0.0, min_tokens=64, window=32,
                                            sparse_layers="all"), 1
    elif method == "token_sparse+retro":  # sparse prefill hands its last rows to RetroAttention
        cache = new_cache(model, n)
        retro = RetroAttention(cache, budget, 16, window=3, dense_layers=0)
        attn, window = TokenSparseAttention(cache, retro, coverage=0.0, min_tokens=64, window=32,
                                            sparse_layers="all"), 3
    else:  # ratio 1 keeps every key: fitted biases ~ 0, values ~ V
        res = compact_prompt(model, prompt, 1.0, separator_ids=tokenizer.encode(REPEAT_PROMPT), max_new_tokens=N_NEW)
        attn, window, start = res.attn, 1, res.start_pos
    out, _ = generate(model, attn, prompt[:, start:], N_NEW, window=window, start_pos=start)
    assert torch.equal(out, dense), f"{method}: {out.tolist()} != dense {dense.tolist()}"
