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


def cli_error(capsys, *args):
    """generate.main(args) in this process must exit != 0 with exactly one line of error; returns it."""
    from generate import main
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", *map(str, args)])
    err = capsys.readouterr().err
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else err
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("[")]  # (not notices)
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--method", "sparse"], "--method 'sparse' is not a method; choose one of: dense, quest, retro"),
    (["--method", "quest", "--page-size", "0"], "--page-size 0: expected a page of >= 1 tokens"),
    (["--method", "quest", "--page-size", "-4"], "--page-size -4: expected a page of >= 1 tokens"),
    (["--top-k", "-1"], "--top-k -1: expected >= 0"),
    (["--temperature", "-1"], "--temperature -1.0: expected >= 0"),
    (["--method", "quest", "--dense-layers", "3"], "--dense-layers 3: the model has 3 layers"),
    (["--method", "retro", "--dense-layers", "7"], "--dense-layers 7: the model has 3 layers"),
    (["--max-new-tokens", "abc"], "argument --max-new-tokens: invalid int value: 'abc'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--ratio", "0.5", "--method", "compact"], "--ratio 0.5: expected >= 1"),
    (["--method", "quest", "--budget", "8", "--page-size", "16"], "smaller than one page"),
    (["--method", "quest", "--budget", "40", "--page-size", "16"], "not a multiple of --page-size"),
    (["--prompt", "x" * 600], "more than the model's context of 512"),
    (["--prompt", "abc", "--max-new-tokens", "600"], "exceeds the context"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "no such file"),
    (["--chat"], "no chat template"),
    (["--method", "quest", "--page-meta", "fp8"], "argument --page-meta: invalid choice: 'fp8'"),
    (["--page-meta", "int8"], "--page-meta int8: only quest, retro and token_sparse with --decode quest|retro"),
])
def test_cli_rejects_bad_input_with_a_clear_message(tiny_checkpoint, capsys, args, message):
    assert message in cli_error(capsys, "--checkpoint", tiny_checkpoint, *args)


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
    from checkpoint import load_model
    from compaction import compact_prompt
    from generate import DEFAULT_CHECKPOINT
    from kvcache import QuestAttention
    from retro import RetroAttention
    from token_sparse import TokenSparseAttention
    m = load_model(DEFAULT_CHECKPOINT, device="cuda")
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


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper GPU or later")
@pytest.mark.parametrize("method", ["quest", "retro"])
def test_programmatic_dependent_launch_changes_no_result(method):
    """The fused model (kernels.pdl: each kernel may launch before the one before it ends, and waits for
    its inputs) gives, from a CUDA graph and eagerly, the tokens and statistics it gives with every
    kernel launched after the one before has finished (kernels.PDL off)."""
    import cudagraph
    import kernels
    from checkpoint import load_model
    from generate import DEFAULT_CHECKPOINT
    from kvcache import QuestAttention
    from retro import RetroAttention
    m = cudagraph.fuse_kernels(load_model(DEFAULT_CHECKPOINT, device="cuda"))
    a = m.args
    prompt = torch.randint(0, a.vocab_size, (1, 500), generator=torch.Generator().manual_seed(4)).cuda()
    window = 3 if method == "retro" else 1
    outs, stats = [], []
    try:
        for on, graph in ((False, False), (True, False), (True, True)):
            kernels.PDL = on
            cache = KVCache(a.n_layers, 1, a.n_kv_heads, 600, a.head_dim, torch.float32, "cuda", page_meta=True)
            attn = (QuestAttention(cache, 128, 16, use_kernels=True) if method == "quest" else
                    RetroAttention(cache, 128, 16, window=window, use_kernels=True))
            outs.append(generate(m, attn, prompt, 48, window=window, cuda_graph=graph)[0])
            stats.append(dict(attn.stats))
    finally:
        kernels.PDL = True
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert stats[1] == pytest.approx(stats[0]) and stats[2] == pytest.approx(stats[0])


# ------------------------------------------------------------------------------------------------
# Bad checkpoint files: one line naming the file and what was expected (tiny files in tmp_path)

def copy_checkpoint(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def edit_config(ckpt, edit):
    import json
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(edit(cfg)))


def write_header(ckpt, header):
    import json
    blob = json.dumps(header).encode()
    (ckpt / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)


def byte_level_tokenizer_json(ckpt, n_bytes=256, pre_tokenizer=None):
    import json
    from tokenizer import bytes_to_unicode
    (ckpt / "tokenizer.model").unlink(missing_ok=True)
    (ckpt / "tokenizer_config_nanokv.json").unlink(missing_ok=True)
    b2u = bytes_to_unicode()
    tj = {"model": {"type": "BPE", "vocab": {b2u[b]: b for b in range(n_bytes)}, "merges": []},
          "added_tokens": [], "pre_tokenizer": pre_tokenizer}
    (ckpt / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("case, message", [
    ("config_list", "config.json: expected a JSON object of config keys, got a JSON list"),
    ("kv_heads_string", "config.json: num_key_value_heads must be a positive integer, got '2'"),
    ("qwen2_no_model_type", "no model_type, and architectures ['Qwen2ForCausalLM'] is not LlamaForCausalLM"),
    ("header_list", "model.safetensors: the safetensors header must be a JSON object"),
    ("entry_no_dtype", "header entry for tensor 'x' must be an object with dtype, shape and data_offsets; it lacks dtype"),
    ("missing_bytes", "the byte-level vocabulary lacks 56 of the 256 single-byte tokens"),
    ("add_prefix_space", "ByteLevel add_prefix_space=true"),
    ("metaspace", "SentencePiece-style BPE (Metaspace / byte fallback: Llama 2, CodeLlama, TinyLlama)"),
    ("sentencepiece_model", "is a SentencePiece model (Llama 2 / CodeLlama / TinyLlama), which is not supported"),
])
def test_bad_checkpoint_files_get_one_line(tiny_checkpoint, tmp_path, capsys, case, message):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    if case == "config_list":
        edit_config(ckpt, lambda cfg: [cfg])
    elif case == "kv_heads_string":
        edit_config(ckpt, lambda cfg: {**cfg, "num_key_value_heads": "2"})
    elif case == "qwen2_no_model_type":
        edit_config(ckpt, lambda cfg: {**{k: v for k, v in cfg.items() if k != "model_type"},
                                       "architectures": ["Qwen2ForCausalLM"]})
    elif case == "header_list":
        write_header(ckpt, [1, 2])
    elif case == "entry_no_dtype":
        write_header(ckpt, {"x": {"shape": [1], "data_offsets": [0, 4]}})
    elif case == "missing_bytes":
        byte_level_tokenizer_json(ckpt, n_bytes=200)
    elif case == "add_prefix_space":
        byte_level_tokenizer_json(ckpt, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True})
    elif case == "metaspace":
        byte_level_tokenizer_json(ckpt, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Metaspace", "replacement": "\u2581"}]})
    elif case == "sentencepiece_model":
        (ckpt / "tokenizer_config_nanokv.json").unlink()
        (ckpt / "tokenizer.model").write_bytes(b"\x0a\x0b\x0a\x05<unk>\x15\x00\x00\x00\x00\x18\x02\x80")
    line = cli_error(capsys, "--checkpoint", ckpt, "--prompt", "hi")
    assert message in line and str(ckpt) in line


def test_tokenizer_larger_than_the_vocabulary_is_refused_at_load(tmp_path, capsys):
    from checkpoint import save_model
    from conftest import tiny_model, write_byte_tokenizer
    save_model(tiny_model(seed=1, vocab_size=256).cpu(), tmp_path)
    write_byte_tokenizer(tmp_path)  # 256 bytes + 2 specials = ids up to 257
    line = cli_error(capsys, "--checkpoint", tmp_path, "--prompt", "hi")
    assert "the tokenizer has ids up to 257, but config.json's vocab_size is 256" in line


def test_config_without_model_type_is_loaded_as_llama_with_a_notice(tiny_checkpoint, tmp_path, capsys):
    from generate import main
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(ckpt, lambda cfg: {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    main(["--checkpoint", str(ckpt), "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2", "--quiet"])
    assert "has no model_type: loading it as Llama" in capsys.readouterr().err


def test_page_meta_int8_reads_fewer_bound_bytes(tiny_checkpoint, capsys):
    """--page-meta int8 runs Quest on int8 page bounds: the cache and the bytes read per token shrink by
    the bounds' share (fp32 cache, head dim 16: 128 -> 36 bytes per page and KV head)."""
    from generate import main
    mib = {}
    for meta in ("auto", "int8"):
        main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--prompt", "x " * 40, "--max-new-tokens", "3",
              "--method", "quest", "--budget", "16", "--page-size", "4", "--dense-layers", "1", "--quiet",
              "--page-meta", meta])
        err = capsys.readouterr().err
        mib[meta] = [float(line.split()[-2]) for line in err.splitlines() if "KV bytes read per decoded token" in line]
    assert len(mib["auto"]) == 1 and mib["int8"][0] < mib["auto"][0]


def test_help_shows_the_defaults():
    from generate import build_parser
    text = build_parser().format_help()
    for flag in ("temperature TEMPERATURE", "max-new-tokens", "page-size", "min-tokens", "ts-window", "top-k"):
        assert flag in text
    for default in ("(default: 0.8)", "(default: 200)", "(default: 16)", "(default: 1024)", "(default: 128)"):
        assert default in " ".join(text.split()), default


def test_a_stop_token_is_never_streamed():
    m = tiny_model(seed=2)
    prompt = torch.randint(0, m.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def run(stop_ids):
        cache = KVCache(m.args.n_layers, 1, m.args.n_kv_heads, 64, m.args.head_dim, torch.float32, DEVICE)
        seen = []
        out, _ = generate(m, DenseAttention(cache), prompt, 12, stop_ids=stop_ids,
                          on_token=lambda t: seen.append(int(t[0])))
        return out[0].tolist(), seen
    free, seen = run(())
    assert seen == free
    for i in (0, 5, 11):  # the first token, one in the middle, the last
        stop = free[i]
        first = free.index(stop)
        out, seen = run({stop})
        assert stop not in seen and seen == free[:first] and out == free[:first + 1]


def test_prefill_progress_and_quiet(tiny_checkpoint, capsys):
    from generate import main
    main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--prompt", "x " * 30, "--max-new-tokens", "2",
          "--prefill-chunk", "16", "--method", "retro", "--budget", "16", "--page-size", "4"])
    err = capsys.readouterr().err
    assert "[prefill] 20/60 tokens" in err and "[prefill] 60/60 tokens" in err  # 3 chunks of about 16
    main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--prompt", "x " * 30, "--max-new-tokens", "2",
          "--prefill-chunk", "16", "--quiet"])
    assert "[prefill]" not in capsys.readouterr().err


def test_compact_runs_on_the_default_prompt_and_reports_the_true_ratio(tiny_checkpoint, capsys):
    from generate import main
    main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--method", "compact", "--max-new-tokens", "2",
          "--ratio", "100000"])
    err = capsys.readouterr().err
    assert "[compact] the default prompt is cut from" in err and "[compact] layer 3/3 compacted" in err
    line = next(line for line in err.splitlines() if "keys per KV head" in line)
    n = int(line.split()[1])
    assert f"{n} prompt tokens -> 1 keys per KV head ({n:.1f}x; --ratio 100000)" in line
    assert "prefill: 1 tokens" in err
