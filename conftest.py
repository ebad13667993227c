"""Shared test setup: where kernels run, Hypothesis profiles, shape strategies, a tiny random model.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before triton is
imported), which is slow: shapes drawn here stay small on CPU and grow on a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# fp16/bf16 kernels are checked on the GPU; the CPU interpreter checks fp32 (it emulates the rest slowly)
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32]
# tolerance on outputs of unit-scale attention, by dtype (inputs rounded to the dtype first)
ATOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               derandomize=True, print_blob=True)
settings.register_profile("ci", max_examples=6, **_common)       # CPU interpreter, 2 cores
settings.register_profile("dev", max_examples=15, **_common)
settings.register_profile("gpu", max_examples=40, **_common)      # compiled kernels are fast
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if ON_GPU else "ci"))

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real SmolLM2-135M model (PyPI download, CPU)")


gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (too slow for the CPU interpreter)")


def seq_lens(max_cpu=70, max_gpu=600):
    """Sequence lengths including 1 and values that are not multiples of any block size."""
    hi = max_gpu if ON_GPU else max_cpu
    return st.one_of(st.just(1), st.integers(1, hi), st.sampled_from([16, 17, 31, 33, 64, 65]).filter(lambda n: n <= hi))


def gqa_heads():
    """(Hq, Hkv) with group sizes 1, 4 and 8."""
    return st.sampled_from([(2, 2), (4, 1), (8, 2), (8, 1)] if not ON_GPU else [(4, 4), (8, 2), (16, 2), (32, 8)])


def head_dims():
    return st.sampled_from([64, 128])


def dtypes():
    return st.sampled_from(DTYPES)


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def tiny_args(**overrides):
    """A tiny Llama 3 style config for fast CPU tests (GQA 2:1, llama3 RoPE scaling)."""
    from model import ModelArgs
    a = dict(vocab_size=300, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
             norm_eps=1e-5, rope_theta=10000.0, max_seq_len=512, tie_embeddings=False,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    a.update(overrides)
    return ModelArgs(**a)


def tiny_model(seed=0, **overrides):
    from model import Transformer
    torch.manual_seed(seed)
    m = Transformer(tiny_args(**overrides))
    m.init_weights(seed)
    return m.to(DEVICE).eval()


def write_byte_tokenizer(path):
    """A 256-token byte-level tokenizer (every byte its own token) plus two special tokens."""
    import json
    from tokenizer import write_rank_file
    write_rank_file({bytes([b]): b for b in range(256)}, path / "tokenizer.model")
    cfg = {"pattern": r"\s+|\S+", "special_tokens": {"<|endoftext|>": 256, "<|bos|>": 257},
           "bos": None, "eos": ["<|endoftext|>"], "chat_format": None}
    (path / "tokenizer_config_nanokv.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny Llama saved in HF layout with a byte tokenizer: what generate.py loads."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    from checkpoint import save_model
    save_model(tiny_model(seed=1).cpu(), path)
    write_byte_tokenizer(path)
    return path
