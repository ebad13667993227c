"""The Llama model and tokenizer: parity with Hugging Face, incremental decoding, errors, the fused kernels."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st

from attention import DenseAttention
from checkpoint import load_model, save_model
from conftest import DEVICE, ON_GPU, tiny_model, write_byte_tokenizer
from cudagraph import (FastLinear, FusedAttention, FusedBlock, FusedMLP, FusedRMSNorm, FusedRoPE, few_rows,
                       fuse_kernels, gemv, linear, rms_norm, rope, silu_mul)
from generate import generate
from kvcache import KVCache
from model import MLP, Attention, Block, RMSNorm, RoPE, apply_rope
from tokenizer import LLAMA3_PATTERN, Tokenizer, write_rank_file


def test_incremental_decoding_equals_full_forward():
    m = tiny_model()
    a = m.args
    toks = torch.randint(0, a.vocab_size, (2, 37), device=DEVICE)
    full = m(toks)
    cache = KVCache(a.n_layers, 2, a.n_kv_heads, 40, a.head_dim, torch.float32, DEVICE)
    attn = DenseAttention(cache)
    parts = [m(toks[:, :20], torch.arange(20), attn)]
    for t in range(20, 37):
        parts.append(m(toks[:, t:t + 1], torch.tensor([t]), attn))
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4


def test_position_beyond_context_is_an_error():
    m = tiny_model(max_seq_len=32)
    with pytest.raises(ValueError, match="beyond the model's context"):
        m(torch.zeros(1, 33, dtype=torch.long, device=DEVICE))


# -- Hugging Face parity -------------------------------------------------------------------------

def hf_llama():
    """transformers.LlamaForCausalLM. transformers >= 5.25 depends on Hugging Face's `kernels` package and
    imports it by that name, which this repository's kernels.py shadows (the repository is on sys.path):
    the Llama classes are imported with our module and directory set aside, then both put back."""
    transformers = pytest.importorskip("transformers", reason="transformers (test-only parity oracle) is not installed")
    here = os.path.dirname(os.path.abspath(__file__))
    ours, path = sys.modules.pop("kernels", None), sys.path[:]
    sys.path[:] = [p for p in path if os.path.abspath(p or os.curdir) != here]
    try:
        return transformers.LlamaForCausalLM  # (a lazy attribute: the modeling modules load here)
    finally:
        sys.path[:] = path
        sys.modules.pop("kernels", None)
        if ours is not None:
            sys.modules["kernels"] = ours


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_huggingface_llama(tmp_path, tie):
    m = tiny_model(seed=3, tie_embeddings=tie)
    save_model(m, tmp_path)
    # use_kernels=False: transformers >= 5.25 would swap in Hugging Face hub kernels (no network here)
    hf = hf_llama().from_pretrained(tmp_path, torch_dtype=torch.float32, use_kernels=False).to(DEVICE).eval()
    ours = load_model(tmp_path, device=DEVICE)
    # long enough that llama3 rope scaling (original context 128) matters
    toks = torch.randint(0, m.args.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        ref = hf(toks).logits.float()
        out = ours(toks)
    diff = (out - ref).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference vs transformers.LlamaForCausalLM: {diff:.3e}"
    print(f"HF parity (tie={tie}): max abs logit difference {diff:.3e}")


# -- Tokenizer -------------------------------------------------------------------------------------

def _train_free_ranks():
    """A small rank file: all bytes plus a few merges, enough to exercise multi-byte tokens."""
    ranks = {bytes([b]): b for b in range(256)}
    for w in [b"  ", b"de", b"def", b" (", b"in", b"  ", b"\n\n", b"se", b"self", "é".encode()]:
        ranks.setdefault(w, len(ranks))
    return ranks


@pytest.fixture(scope="module")
def llama3_style_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_rank_file(_train_free_ranks(), d / "tokenizer.model")  # no config file: Llama 3 defaults
    return Tokenizer(d)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_tokenizer_round_trips_any_text(llama3_style_tokenizer, text):
    assert llama3_style_tokenizer.decode(llama3_style_tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ["def f(x):\n    return x  ** 2\n\n\n", "naïve café — 東京 🙂", "a\t\t b   \n  \r\n",
                                  "12345678 3.14159"])
def test_tokenizer_round_trips_code_unicode_whitespace(llama3_style_tokenizer, text):
    ids = llama3_style_tokenizer.encode(text)
    assert llama3_style_tokenizer.decode(ids) == text


def test_llama3_special_tokens_and_chat_template(llama3_style_tokenizer):
    tok = llama3_style_tokenizer
    n = len(_train_free_ranks())
    assert tok.special_tokens["<|begin_of_text|>"] == n and tok.special_tokens["<|eot_id|>"] == n + 9
    assert tok.encode("hi", bos=True)[0] == n
    # special tokens in user text are plain text unless asked for
    assert n not in tok.encode("<|begin_of_text|>")
    ids = tok.chat_prompt("hello")
    assert ids[0] == n and ids[-2:] == tok.encode("\n\n") or ids[-1] == tok.encode("\n\n")[-1]
    assert tok.special_tokens["<|start_header_id|>"] in ids and tok.special_tokens["<|eot_id|>"] in ids
    assert tok.stop_ids == {n + 1, n + 8, n + 9}


def test_tokenizer_config_file_and_missing_files(tmp_path):
    write_byte_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.encode("ab") == [97, 98] and tok.stop_ids == {256} and tok.bos_id is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.chat_prompt("x")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path / "empty_dir_that_is_missing")


def test_hf_tokenizer_json_matches_huggingface(tmp_path):
    pytest.importorskip("tokenizers", reason="tokenizers (test-only oracle) is not installed")
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, decoders, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    corpus = [open(__file__).read(), open("model.py").read()] * 2
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer(tmp_path)
    text = "def forward(self, x):  # naïve\n    return x  ** 2  \n\n\t12345 东京"
    assert ours.encode(text) == hf.encode(text).ids
    assert ours.decode(ours.encode(text)) == text
    assert ours.special_tokens["<|endoftext|>"] == hf.token_to_id("<|endoftext|>")


def test_llama3_pattern_is_the_published_one():
    # the split regex is part of the tokenizer: a typo would silently change every id
    assert LLAMA3_PATTERN.startswith(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}")


# ------------------------------------------------------------------------------------------------
# The model's one-launch kernels (cudagraph.fuse_kernels) against the PyTorch code they replace

# bf16: one rounding step on the GPU. The CPU interpreter truncates casts to bf16 (Triton 3.9) where torch rounds
# to nearest, so a kernel that rounds twice (the normalized x or the silu, then the output) may be 2^-6 off there.
BF16_TOL = dict(atol=2e-2, rtol=1e-2 if ON_GPU else 1.6e-2)


@given(rows=st.integers(1, 5), dim=st.sampled_from([8, 48, 64, 576]), dtype=st.sampled_from(["fp32", "bf16"]),
       seed=st.integers(0, 2**16))
@example(rows=1, dim=576, dtype="bf16", seed=11938)  # 2^-6 off on the CPU (BF16_TOL)
def test_rms_norm_kernel_matches_module(rows, dim, dtype, seed):
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, 1e-5).to(DEVICE, dt)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g))
    x = (torch.randn(2, rows, dim, generator=g) * 3).to(DEVICE, dt)
    ref = norm(x)
    got = rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == dt and got.shape == x.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dt == torch.float32 else BF16_TOL
    torch.testing.assert_close(got.float(), ref.float(), **tol)


@given(T=st.integers(1, 6), H=st.sampled_from([1, 3]), D=st.sampled_from([8, 64, 80, 128]),
       dtype=st.sampled_from(["fp32", "bf16"]), seed=st.integers(0, 2**16))
@example(T=2, H=1, D=128, dtype="bf16", seed=289)  # silu_mul 2^-6 off on the CPU (BF16_TOL)
def test_rope_and_silu_mul_kernels_match_reference(T, H, D, dtype, seed):
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, H, D, generator=g).to(DEVICE, dt)
    angle = torch.rand(T, D // 2, generator=g) * 100
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(DEVICE), torch.cat([angle.sin()] * 2, -1).to(DEVICE)
    tol = dict(atol=1e-5, rtol=1e-5) if dt == torch.float32 else BF16_TOL
    torch.testing.assert_close(rope(x, cos, sin).float(), apply_rope(x, cos, sin).float(), **tol)
    gate, up = torch.randn(3, T, D, generator=g).to(DEVICE, dt), torch.randn(3, T, D, generator=g).to(DEVICE, dt)
    torch.testing.assert_close(silu_mul(gate, up).float(), (F.silu(gate) * up).float(), **tol)
    gate, up = torch.randn(3, T, 2 * D, generator=g).to(DEVICE, dt).chunk(2, dim=-1)  # halves: rows of stride 2D
    for gate, up in ((gate, up), (gate.transpose(0, 1), up.transpose(0, 1))):  # (and rows of no one stride)
        torch.testing.assert_close(silu_mul(gate, up).float(), (F.silu(gate) * up).float(), **tol)


@given(N=st.integers(1, 40), K=st.integers(1, 300), dtype=st.sampled_from(["fp32", "bf16"]), seed=st.integers(0, 2**16))
def test_gemv_kernel_matches_linear(N, K, dtype, seed):
    """One row times a weight that is every other row of a larger matrix (its row stride is not K)."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(1, 1, K, generator=g).to(DEVICE, dt), torch.randn(2 * N, K, generator=g).to(DEVICE, dt)[::2]
    got = gemv(x, w)
    assert got.shape == (1, 1, N) and got.dtype == dt
    tol = dict(atol=1e-4, rtol=1e-4) if dt == torch.float32 else dict(atol=5e-2, rtol=2e-2)  # bf16: one rounding
    torch.testing.assert_close(got.float(), (x.double() @ w.double().T).float(), **tol)


@given(N=st.integers(1, 40), K=st.integers(1, 300), dtype=st.sampled_from(["fp32", "bf16"]), seed=st.integers(0, 2**16))
def test_gemv_adds_the_residual(N, K, dtype, seed):
    """gemv(x, w, residual=r) == r + x w^T in one launch (model.Block's residual adds); float64 oracle."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(1, 1, K, generator=g).to(DEVICE, dt), torch.randn(N, K, generator=g).to(DEVICE, dt)
    r = torch.randn(1, 1, N, generator=g).to(DEVICE, dt) * 4
    tol = dict(atol=1e-4, rtol=1e-4) if dt == torch.float32 else dict(atol=8e-2, rtol=3e-2)  # bf16: rounds twice
    torch.testing.assert_close(gemv(x, w, residual=r).float(), (r.double() + x.double() @ w.double().T).float(), **tol)


@given(M=st.integers(1, 16), N=st.integers(1, 90), K=st.integers(1, 600), residual=st.booleans(),
       dtype=st.sampled_from(["fp32", "fp16", "bf16"] if ON_GPU else ["fp32", "fp16"]), seed=st.integers(0, 2**16))
@example(M=16, N=33, K=513, residual=True, dtype="fp32", seed=0)  # all 16 rows, tails on N and K
def test_few_rows_matches_a_float64_product(M, N, K, residual, dtype, seed):
    """few_rows(x, w, r) == r + x w^T for 1-16 rows (in a (2, M/2)-like batch shape), weight rows of stride
    2K; float64 oracle. (The CPU interpreter's tl.dot is wrong for bf16: checked on the GPU.)"""
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(seed)
    lead = (2, M // 2) if M % 2 == 0 else (1, M)
    x, w = torch.randn(*lead, K, generator=g).to(DEVICE, dt), torch.randn(2 * N, K, generator=g).to(DEVICE, dt)[::2]
    r = (torch.randn(*lead, N, generator=g) * 4).to(DEVICE, dt) if residual else None
    want = x.double() @ w.double().T + (r.double() if residual else 0)
    got = few_rows(x, w, r)
    assert got.shape == (*lead, N) and got.dtype == dt
    tol = dict(atol=1e-4, rtol=1e-4) if dt == torch.float32 else dict(atol=8e-2, rtol=3e-2)  # rounds once or twice
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if M > 1:  # linear sends 2-16 rows here and adds the same residual
        torch.testing.assert_close(linear(x, w, r).float(), got.float(), atol=0, rtol=0)


def test_model_kernels_reject_shapes_they_would_read_past():
    x = torch.randn(1, 2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"rms_norm: weight \(4,\)"):
        rms_norm(x, torch.ones(4, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match=r"rope: x \(1, 2, 3, 8\).*\(1, 8\)"):
        rope(x, torch.ones(1, 8, device=DEVICE), torch.ones(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"silu_mul: gate \(1, 2, 3, 8\) and up \(1, 2, 3, 4\)"):
        silu_mul(x, x[..., :4])
    with pytest.raises(ValueError, match=r"gemv: x \(1, 2, 3, 8\)"):
        gemv(x, torch.ones(5, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"gemv: residual \(4,\)"):
        gemv(x[:1, :1, 0], torch.ones(5, 8, device=DEVICE), residual=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match=r"few_rows: x \(1, 17, 8\) must be 1 to 16 rows"):
        few_rows(torch.ones(1, 17, 8, device=DEVICE), torch.ones(5, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"few_rows: residual \(2, 3, 4\)"):
        few_rows(x[0], torch.ones(5, 8, device=DEVICE), residual=torch.ones(2, 3, 4, device=DEVICE))


def test_fused_model_gives_the_same_decode_step():
    """A decode step (batch 1, one token: FusedBlock's GEMVs with the residual adds) and a step of 3 rows
    (as Retro's window: the gate | up halves read in place), both with FusedAttention's q and k turned in
    one launch, give the logits of model.py's modules."""
    m = tiny_model(seed=7)
    a = m.args
    prompt = torch.randint(0, a.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    logits = []
    for fused in (False, True):
        if fused:
            fuse_kernels(m)
        attn = DenseAttention(KVCache(a.n_layers, 1, a.n_kv_heads, 16, a.head_dim, torch.float32, DEVICE))
        m(prompt[:, :8], torch.arange(8), attn)
        logits.append(m(prompt[:, 8:9], torch.tensor([8], device=DEVICE), attn, decode=True))
        logits.append(m(prompt[:, 9:], torch.arange(9, 12), attn))  # 3 rows
    torch.testing.assert_close(logits[2], logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[3], logits[1], atol=1e-4, rtol=1e-4)


def test_model_kernels_give_the_same_greedy_tokens():
    m = tiny_model(seed=6)
    a = m.args
    prompt = torch.randint(0, a.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    outs, logits = [], []
    names = list(m.state_dict())
    for fused in (False, True):
        if fused:
            fuse_kernels(m)
        cache = KVCache(a.n_layers, 1, a.n_kv_heads, 40, a.head_dim, torch.float32, DEVICE)
        outs.append(generate(m, DenseAttention(cache), prompt, 10)[0])
        logits.append(m(prompt))
    assert list(m.state_dict()) == names  # the same weights under the same names
    kinds = {type(x) for x in m.modules()}
    assert {FusedMLP, FusedRMSNorm, FusedRoPE, FusedAttention, FastLinear, FusedBlock} <= kinds
    assert not {RMSNorm, RoPE, MLP, Attention, torch.nn.Linear, Block} & kinds
    assert torch.equal(outs[1], outs[0])
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
