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
