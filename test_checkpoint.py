"""checkpoint.py: a Hugging Face Llama checkpoint directory read and written by hand: round trips,
low-precision and sharded files, tied embeddings, both spellings of RoPE settings, errors that name the problem."""

import json

import pytest
import torch

from checkpoint import args_from_hf_config, hf_config, load_model, load_safetensors, save_model, save_safetensors
from conftest import DEVICE, tiny_args, tiny_model


def test_save_then_load_gives_same_logits(tmp_path):
    m = tiny_model()
    toks = torch.randint(0, m.args.vocab_size, (1, 16), device=DEVICE)
    save_model(m, tmp_path)
    m2 = load_model(tmp_path, device=DEVICE)
    assert torch.equal(m(toks), m2(toks))
    # low-precision files load and are cast to the requested dtype
    save_model(m, tmp_path / "bf16", dtype=torch.bfloat16)
    m3 = load_model(tmp_path / "bf16", dtype=torch.float32, device=DEVICE)
    assert m3.lm_head.weight.dtype == torch.float32
    assert (m(toks) - m3(toks)).abs().max() < 0.05


def test_tied_embeddings_round_trip(tmp_path):
    m = tiny_model(tie_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    save_model(m, tmp_path)
    assert "lm_head.weight" not in load_safetensors(tmp_path / "model.safetensors")
    m2 = load_model(tmp_path, device=DEVICE)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    toks = torch.arange(10, device=DEVICE)[None]
    assert torch.equal(m(toks), m2(toks))


def test_sharded_checkpoint_loads(tmp_path):
    m = tiny_model()
    state = {k: v.cpu() for k, v in m.state_dict().items()}
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_safetensors({k: state[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(m.args)))
    m2 = load_model(tmp_path, device=DEVICE)
    toks = torch.arange(12, device=DEVICE)[None]
    assert torch.equal(m(toks), m2(toks))


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    m = tiny_model()
    save_model(m, tmp_path)
    state = {k: v.clone() for k, v in load_safetensors(tmp_path / "model.safetensors").items()}
    # a missing tensor
    save_safetensors({k: v for k, v in state.items() if k != "model.norm.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="model.norm.weight"):
        load_model(tmp_path)
    # a shape that does not match the config
    state["model.norm.weight"] = torch.ones(3)
    save_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        load_model(tmp_path)
    # not a safetensors file
    (tmp_path / "model.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(tmp_path)
    # unsupported architecture / rope scaling
    cfg = hf_config(m.args)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(ValueError, match="yarn"):
        load_model(tmp_path)


def test_config_reads_hub_and_transformers5_rope_spellings():
    base = hf_config(tiny_args())
    scaling = dict(base["rope_scaling"])
    hub = dict(base, rope_theta=500000.0, rope_scaling=scaling)
    v5 = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(scaling, rope_theta=500000.0)
    a, b = args_from_hf_config(hub), args_from_hf_config(v5)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"
    plain = dict(v5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert args_from_hf_config(plain).rope_scaling is None
    # Llama 2 style: no head_dim, no num_key_value_heads
    l2 = {k: v for k, v in base.items() if k not in ("head_dim", "num_key_value_heads", "rope_scaling")}
    a2 = args_from_hf_config(l2)
    assert a2.n_kv_heads == a2.n_heads and a2.head_dim == a2.dim // a2.n_heads
