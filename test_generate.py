"""generate.py: the decode loop equals a full forward, and bad input gets a clear message."""

import subprocess
import sys

import pytest
import torch

from attention import DenseAttention
from conftest import DEVICE, tiny_model
from generate import generate
from kvcache import KVCache


def greedy_by_full_forward(model, prompt, n):
    toks = prompt
    for _ in range(n):
        nxt = model(toks)[:, -1].argmax(-1, keepdim=True)
        toks = torch.cat([toks, nxt], 1)
    return toks[:, prompt.shape[1]:]


def test_greedy_generate_with_cache_equals_full_forward():
    m = tiny_model(seed=2)
    a = m.args
    prompt = torch.randint(0, a.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cache = KVCache(a.n_layers, 2, a.n_kv_heads, 64, a.head_dim, torch.float32, DEVICE)
    out, t = generate(m, DenseAttention(cache), prompt, 12)
    assert torch.equal(out, greedy_by_full_forward(m, prompt, 12))
    assert t["decode_steps"] == 11


def run_cli(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_generates_and_reports(tiny_checkpoint):
    r = run_cli("--checkpoint", tiny_checkpoint, "--prompt", "hello world", "--max-new-tokens", 8, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for stat in ("prefill:", "decode:", "peak memory:", "KV bytes read per decoded token"):
        assert stat in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--method", "sparse"], "--method 'sparse' is not a method; choose one of: dense, quest, retro"),
    (["--method", "quest", "--budget", "8", "--page-size", "16"], "smaller than one page"),
    (["--method", "quest", "--budget", "40", "--page-size", "16"], "not a multiple of --page-size"),
    (["--prompt", "x" * 600], "more than the model's context of 512"),
    (["--prompt", "abc", "--max-new-tokens", "600"], "exceeds the context"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "no such file"),
    (["--chat"], "no chat template"),
])
def test_cli_rejects_bad_input_with_a_clear_message(tiny_checkpoint, args, message):
    r = run_cli("--checkpoint", tiny_checkpoint, "--device", "cpu", *args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_names_a_bad_checkpoint(tmp_path):
    r = run_cli("--checkpoint", tmp_path, "--device", "cpu")
    assert r.returncode != 0 and "config.json" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--checkpoint", tmp_path / "missing", "--device", "cpu")
    assert r.returncode != 0 and "no such directory" in r.stderr


def test_cuda_graph_refusals_name_the_reason():
    from cudagraph import unsupported
    cache = KVCache(1, 1, 2, 64, 8, torch.float32, DEVICE, page_size=4)
    assert "--device cuda" in unsupported(DenseAttention(cache, use_kernels=True), torch.device("cpu"))
    cuda = torch.device("cuda")
    assert "Triton kernels" in unsupported(DenseAttention(cache, use_kernels=False), cuda)
    assert unsupported(DenseAttention(cache, use_kernels=True), cuda) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("method", ["dense", "quest", "quest_covering", "retro", "retro_short_prompt", "token_sparse",
                                    "compact"])
def test_cuda_graph_decoding_gives_the_eager_tokens(method):
    """On the default model (fp32): the decode step replayed from a CUDA graph gives eager's greedy
    tokens and statistics, for every method (a budget covering the cache, a prompt shorter than the
    window, a token-sparse prefill, a compacted cache included)."""
    from compaction import compact_prompt
    from generate import DEFAULT_CHECKPOINT
    from kvcache import QuestAttention
    from model import Transformer
    from retro import RetroAttention
    from token_sparse import TokenSparseAttention
    m = Transformer.from_pretrained(DEFAULT_CHECKPOINT, device="cuda")
    a = m.args
    n_prompt = 2 if method == "retro_short_prompt" else 600
    prompt = torch.randint(0, a.vocab_size, (1, n_prompt), generator=torch.Generator().manual_seed(3)).cuda()
    window = {"retro": 3, "retro_short_prompt": 4}.get(method, 1)
    outs, stats = [], []
    for graph in (False, True):
        cache = KVCache(a.n_layers, 1, a.n_kv_heads, 700, a.head_dim, torch.float32, "cuda", page_meta=method != "dense")
        start_pos, p = 0, prompt
        if method == "compact":
            res = compact_prompt(m, prompt, 10, max_new_tokens=64, use_kernels=True)
            attn, start_pos, p = res.attn, res.start_pos, prompt[:, res.start_pos:]
        else:
            attn = {"dense": lambda: DenseAttention(cache, use_kernels=True),
                    "quest": lambda: QuestAttention(cache, 256, 16, use_kernels=True),
                    "quest_covering": lambda: QuestAttention(cache, 704, 16, use_kernels=True),
                    "retro": lambda: RetroAttention(cache, 256, 16, window=3, use_kernels=True),
                    "retro_short_prompt": lambda: RetroAttention(cache, 32, 16, window=4, use_kernels=True),
                    "token_sparse": lambda: TokenSparseAttention(cache, QuestAttention(cache, 256, 16, use_kernels=True),
                                                                 0.005, 128, 32, "half", use_kernels=True)}[method]()
        outs.append(generate(m, attn, p, 64, window=window, start_pos=start_pos, cuda_graph=graph)[0])
        stats.append({k: v for k, v in attn.stats.items() if not k.startswith(("ts_", "compaction", "ref_"))})
    assert torch.equal(outs[1], outs[0])
    assert stats[1] == pytest.approx(stats[0]) and stats[1]["decode_steps"] == 63
