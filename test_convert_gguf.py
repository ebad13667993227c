"""convert_gguf.py on small GGUF files written here: block formats, the RoPE un-permutation, names,
the tokenizer files and the errors. (The real SmolLM2 file is tested in test_real_model.py.)"""

import json
import struct

import numpy as np
import pytest
import torch

import convert_gguf
from convert_gguf import GGUFFile, bytes_to_unicode, convert, unpermute

# ----------------------------------------------------------------------------------------------------
# A tiny GGUF writer (the inverse of the reader's layout)

U32, I32, F32, BOOL, STR, ARR = 4, 5, 6, 7, 8, 9


def _str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(vtype, v):
    if vtype == STR:
        return _str(v)
    if vtype == ARR:
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, x) for x in items)
    return struct.pack({U32: "<I", I32: "<i", F32: "<f", BOOL: "<?"}[vtype], v)


def write_gguf(path, metadata, tensors, magic=b"GGUF", version=3, align=32):
    """metadata: {key: (type, value)}; tensors: {name: (ggml_type, numpy shape, raw bytes)}."""
    head = magic + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for k, (t, v) in metadata.items():
        head += _str(k) + struct.pack("<I", t) + _value(t, v)
    data, offsets = b"", []
    for name, (gtype, shape, raw) in tensors.items():
        data += b"\0" * (-len(data) % align)
        offsets.append(len(data))
        data += raw
    for (name, (gtype, shape, raw)), off in zip(tensors.items(), offsets):
        dims = list(reversed(shape))
        head += _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", gtype, off)
    head += b"\0" * (-len(head) % align)
    with open(path, "wb") as f:
        f.write(head + data)


def q8_0_blocks(rng, n_blocks):
    blocks = np.zeros(n_blocks, convert_gguf._Q8_0)
    blocks["d"] = rng.uniform(0.01, 0.1, n_blocks)
    blocks["qs"] = rng.integers(-128, 128, (n_blocks, 32))
    return blocks


def q4_1_blocks(rng, n_blocks):
    blocks = np.zeros(n_blocks, convert_gguf._Q4_1)
    blocks["d"] = rng.uniform(0.01, 0.1, n_blocks)
    blocks["m"] = rng.uniform(-0.5, 0.5, n_blocks)
    blocks["qs"] = rng.integers(0, 256, (n_blocks, 16))
    return blocks


# ----------------------------------------------------------------------------------------------------
# Block formats, checked against the format's definition written as a loop

def test_quantized_blocks_dequantize_by_their_definition(tmp_path):
    rng = np.random.default_rng(0)
    q8, q4 = q8_0_blocks(rng, 6), q4_1_blocks(rng, 6)
    f16 = rng.standard_normal((4, 8)).astype(np.float16)
    bf16_values = rng.standard_normal((4, 8)).astype(np.float32)
    bf16 = (bf16_values.view(np.uint32) >> 16).astype(np.uint16)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    write_gguf(tmp_path / "t.gguf", {}, {"q8": (8, (3, 64), q8.tobytes()), "q4": (3, (6, 32), q4.tobytes()),
                                         "f16": (1, (4, 8), f16.tobytes()), "bf16": (30, (4, 8), bf16.tobytes()),
                                         "f32": (0, (3, 5), f32.tobytes())})
    g = GGUFFile(tmp_path / "t.gguf")

    want_q8 = [float(b["d"]) * int(q) for b in q8 for q in b["qs"]]
    want_q4 = []
    for b in q4:  # 16 bytes: element i is the low nibble of byte i, element 16 + i its high nibble
        nibbles = [int(x) & 0xF for x in b["qs"]] + [int(x) >> 4 for x in b["qs"]]
        want_q4 += [np.float32(b["d"]) * q + np.float32(b["m"]) for q in nibbles]
    np.testing.assert_allclose(g.dequantize("q8").ravel(), want_q8, rtol=1e-6)
    np.testing.assert_allclose(g.dequantize("q4").ravel(), want_q4, rtol=1e-6)
    assert g.dequantize("q8").shape == (3, 64) and g.dequantize("q4").shape == (6, 32)
    assert np.array_equal(g.dequantize("f16"), f16.astype(np.float32))
    assert np.array_equal(g.dequantize("bf16"), (bf16.astype(np.uint32) << 16).view(np.float32))
    assert np.array_equal(g.dequantize("f32"), f32)


def test_metadata_of_every_type_reads_back(tmp_path):
    md = {"a.u32": (U32, 7), "a.i32": (I32, -3), "a.f32": (F32, 0.5), "a.bool": (BOOL, True), "a.str": (STR, "héllo"),
          "a.ints": (ARR, (I32, [1, -2, 3])), "a.strs": (ARR, (STR, ["x", "", "ÿz"])),
          "a.nested": (ARR, (ARR, [(U32, [1]), (STR, ["q"])])), "general.alignment": (U32, 64)}
    write_gguf(tmp_path / "m.gguf", md, {"w": (0, (2, 2), np.arange(4, dtype=np.float32).tobytes())}, align=64)
    g = GGUFFile(tmp_path / "m.gguf")
    assert g.metadata == {"a.u32": 7, "a.i32": -3, "a.f32": 0.5, "a.bool": True, "a.str": "héllo",
                          "a.ints": [1, -2, 3], "a.strs": ["x", "", "ÿz"], "a.nested": [[1], ["q"]],
                          "general.alignment": 64}
    assert g.dequantize("w").tolist() == [[0, 1], [2, 3]]


# ----------------------------------------------------------------------------------------------------
# RoPE layouts

def rope_interleaved(x, pos, theta=10000.0):
    """llama.cpp's RoPE: rotate pairs (x0, x1), (x2, x3), ... x: (H, D)."""
    D = x.shape[-1]
    ang = pos / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def rope_half(x, pos, theta=10000.0):
    """HF's RoPE: rotate (x_i, x_{i + D/2})."""
    D = x.shape[-1]
    ang = pos / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    a, b = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def test_unpermuted_weights_give_the_same_attention_scores_under_hf_rope():
    torch.manual_seed(0)
    H, D, dim = 3, 8, 12
    wq_hf, wk_hf = torch.randn(H * D, dim, dtype=torch.float64), torch.randn(H * D, dim, dtype=torch.float64)
    wq_gg, wk_gg = llama_cpp_permute(wq_hf, H), llama_cpp_permute(wk_hf, H)
    assert np.array_equal(unpermute(wq_gg.numpy(), H), wq_hf.numpy())
    x1, x2 = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    # llama.cpp: permuted weights + interleaved RoPE; HF: original weights + rotate_half RoPE
    s_gg = (rope_interleaved((wq_gg @ x1).view(H, D), 7) * rope_interleaved((wk_gg @ x2).view(H, D), 3)).sum(-1)
    s_hf = (rope_half((wq_hf @ x1).view(H, D), 7) * rope_half((wk_hf @ x2).view(H, D), 3)).sum(-1)
    torch.testing.assert_close(s_gg, s_hf)


# ----------------------------------------------------------------------------------------------------
# A whole tiny Llama through convert() into model.py

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden=48)


def tiny_llama_gguf(path, rng, arch="llama", tied=True, embd_type=8, drop=()):
    """A byte-level BPE vocabulary (256 bytes + 2 merges + 2 specials) and random weights; without
    the metadata keys in drop."""
    b2u = bytes_to_unicode()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [b2u[b] for b in range(256)] + ["Ġt", "Ġth"]
    ttypes = [3] * len(specials) + [1] * 258
    tokens += [f"<pad{i}>" for i in range(3)]    # user-defined tokens (type 4) count as special
    ttypes += [4] * 3
    V, d, hd = len(tokens), TINY["dim"], TINY["head_dim"]
    md = {"general.architecture": (STR, arch), f"{arch}.block_count": (U32, TINY["n_layers"]),
          f"{arch}.context_length": (U32, 256), f"{arch}.embedding_length": (U32, d),
          f"{arch}.feed_forward_length": (U32, TINY["hidden"]), f"{arch}.attention.head_count": (U32, TINY["n_heads"]),
          f"{arch}.attention.head_count_kv": (U32, TINY["n_kv_heads"]), f"{arch}.rope.freq_base": (F32, 10000.0),
          f"{arch}.attention.layer_norm_rms_epsilon": (F32, 1e-5), "tokenizer.ggml.model": (STR, "gpt2"),
          "tokenizer.ggml.pre": (STR, "smollm"), "tokenizer.ggml.tokens": (ARR, (STR, tokens)),
          "tokenizer.ggml.token_type": (ARR, (I32, ttypes)), "tokenizer.ggml.merges": (ARR, (STR, ["Ġ t", "Ġt h"])),
          "tokenizer.ggml.bos_token_id": (U32, 1), "tokenizer.ggml.eos_token_id": (U32, 2),
          "tokenizer.ggml.add_bos_token": (BOOL, False)}
    md = {key: value for key, value in md.items() if key not in drop}
    f32 = lambda *s: (0, s, rng.standard_normal(s).astype(np.float32).tobytes())  # noqa: E731
    q41 = lambda o, i: (3, (o, i), q4_1_blocks(rng, o * i // 32).tobytes())     # noqa: E731
    tensors = {"token_embd.weight": (8, (V, d), q8_0_blocks(rng, V * d // 32).tobytes()) if embd_type == 8
               else (embd_type, (V, d), b"\0" * (V * d // 256 * 144)),
               "output_norm.weight": f32(d)}
    if not tied:
        tensors["output.weight"] = q41(V, d)
    for i in range(TINY["n_layers"]):
        kv = TINY["n_kv_heads"] * hd
        tensors.update({f"blk.{i}.attn_norm.weight": f32(d), f"blk.{i}.ffn_norm.weight": f32(d),
                        f"blk.{i}.attn_q.weight": q41(d, d), f"blk.{i}.attn_k.weight": q41(kv, d),
                        f"blk.{i}.attn_v.weight": q41(kv, d), f"blk.{i}.attn_output.weight": q41(d, d),
                        f"blk.{i}.ffn_gate.weight": q41(TINY["hidden"], d),
                        f"blk.{i}.ffn_up.weight": q41(TINY["hidden"], d),
                        f"blk.{i}.ffn_down.weight": q41(d, TINY["hidden"])})
    write_gguf(path, md, tensors)
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_converts_and_loads_in_model_py(tmp_path, tied):
    from checkpoint import load_model
    from tokenizer import Tokenizer
    gguf_path = tiny_llama_gguf(tmp_path / "tiny.gguf", np.random.default_rng(1), tied=tied)
    convert(str(gguf_path), str(tmp_path / "ckpt"), sha256=convert_gguf.file_sha256(gguf_path))
    g = GGUFFile(gguf_path)
    model = load_model(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 8
    sd = model.state_dict()
    assert np.array_equal(sd["model.embed_tokens.weight"].numpy(), g.dequantize("token_embd.weight"))
    assert np.array_equal(sd["model.layers.1.self_attn.q_proj.weight"].numpy(),
                          unpermute(g.dequantize("blk.1.attn_q.weight"), 4))
    assert np.array_equal(sd["model.layers.0.self_attn.k_proj.weight"].numpy(),
                          unpermute(g.dequantize("blk.0.attn_k.weight"), 2))
    assert np.array_equal(sd["model.layers.0.mlp.down_proj.weight"].numpy(), g.dequantize("blk.0.ffn_down.weight"))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    logits = model(torch.tensor([[5, 6, 7]]))
    assert logits.shape == (1, 3, 264) and torch.isfinite(logits).all()

    tok = Tokenizer(tmp_path / "ckpt")
    ids = tok.encode(" the 12")                     # " t" + "h" merge to " th"; digits stay single
    assert [g.metadata["tokenizer.ggml.tokens"][i] for i in ids] == ["Ġth", "e", "Ġ", "1", "2"]
    assert tok.decode(ids) == " the 12"
    assert tok.encode("<|im_end|>", allow_special=True) == [2]
    assert tok.stop_ids == {2, 0} and tok.bos_id is None and tok.chat_format == "chatml"


def test_conversion_is_skipped_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "done"
    out.mkdir()
    for name in convert_gguf.CHECKPOINT_FILES:
        (out / name).write_text("x")
    monkeypatch.setattr(convert_gguf.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    assert convert_gguf.fetch_smollm2(str(out), verbose=False) == str(out)


# ----------------------------------------------------------------------------------------------------
# Errors that name the file and what was expected

def test_wrong_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(tmp_path / "x.gguf")


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", np.random.default_rng(2))
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        convert(str(path), str(tmp_path / "out"), sha256="0" * 64)


def test_unsupported_quantization_is_named(tmp_path):
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", np.random.default_rng(3), embd_type=12)
    with pytest.raises(ValueError, match="token_embd.weight is quantized as Q4_K; supported: F32, F16, Q4_1, Q8_0"):
        convert(str(path), str(tmp_path / "out"))


def test_other_architectures_are_rejected(tmp_path):
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", np.random.default_rng(4), arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        convert(str(path), str(tmp_path / "out"))


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.block_count", "tokenizer.ggml.tokens"])
def test_missing_metadata_is_one_line_naming_the_key_and_nothing_is_written(tmp_path, capsys, key):
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", np.random.default_rng(5), drop=(key,))
    with pytest.raises(SystemExit) as e:
        convert_gguf.main([str(path), str(tmp_path / "out"), "--quiet"])
    assert e.value.code != 0 and f"lacks {key!r}" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "out").exists()


def test_conversion_prints_progress_unless_quiet(tmp_path, capsys):
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", np.random.default_rng(6))
    convert_gguf.main([str(path), str(tmp_path / "a")])
    assert "[convert] dequantizing tensor 1/" in capsys.readouterr().out
    convert_gguf.main([str(path), str(tmp_path / "b"), "--quiet"])
    assert "[convert]" not in capsys.readouterr().out
