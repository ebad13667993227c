"""tp.py: two gloo processes, each with half the heads, decode exactly what one process decodes.

The two ranks are spawned by the test (torch.multiprocessing, a FileStore: no port to pick), run
every method and the cross-head rules, and save what they saw; the test compares it with the same
work done here by one process on the full model. A rank that fails or hangs fails the test.
"""

import contextlib
import io
import os
import time
import traceback
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import tp
from checkpoint import load_model, load_safetensors, save_model, save_safetensors
from model import ModelArgs, Transformer

WORLD = 2
NEW_TOKENS = 6
OPTS = SimpleNamespace(budget=8, page_size=4, dense_layers=1, window=2, page_choice="kv_head", decode="retro",
                       coverage=0.2, min_tokens=4, ts_window=4, sparse_layers="all", keep=None,
                       coverage_rule="authors")
RUNS = ["dense", "quest", "retro", "token_sparse", "compact"]
CLI = ["--prompt", "two ranks, one text", "--max-new-tokens", "8", "--device", "cpu", "--temperature", "0",
       "--method", "retro", "--budget", "8", "--page-size", "4", "--dense-layers", "1"]


def tiny_model():
    """4 query heads, 2 KV heads, MLP width 96: 2 query heads, 1 KV head and 48 units per rank. The
    weights are larger than a trained model's init, so attention is peaked and the methods differ."""
    args = ModelArgs(vocab_size=300, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=96,
                     max_seq_len=128, rope_theta=10000.0)
    model = Transformer(args)
    model.init_weights(seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(12)
    return model.eval()


def decode_all(model, runs=RUNS):
    """Greedy tokens of every method, and Token Sparse's kept fraction per layer (its coverage rule)."""
    from compaction import compact_prompt
    from generate import generate, make_attention
    from kvcache import KVCache
    a = model.args
    prompt = torch.randint(0, a.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    out = {}
    for run in runs:
        start = 0
        if run == "compact":
            res = compact_prompt(model, prompt, 4, separator_ids=[1, 2, 3], max_new_tokens=NEW_TOKENS)
            attn, start = res.attn, res.start_pos
        else:
            cache = KVCache(a.n_layers, 1, a.n_kv_heads, 64, a.head_dim, torch.float32, "cpu", page_size=OPTS.page_size)
            attn = make_attention(run, cache, OPTS, use_kernels=False)
        tokens, _ = generate(model, attn, prompt[:, start:], NEW_TOKENS, start_pos=start)
        out[run] = tokens[0].tolist()
        if run == "token_sparse":
            out["kept"] = attn.stats["ts_kept_fraction_per_layer"]
    return out


def cross_head_inputs():
    """Scores for Token Sparse's coverage and per-head errors for compaction's budgets, all heads."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 4, 50, generator=g) ** 6 * torch.tensor([1.0, 30.0, 0.01, 3.0])[None, :, None]
    k, v = torch.randn(1, 4, 24, 8, generator=g), torch.randn(1, 4, 24, 8, generator=g)
    q = torch.randn(1, 8, 12, 8, generator=g) * torch.tensor([0.2, 0.2, 1, 1, 3, 3, 6, 6])[None, :, None, None]
    return scores, k, v, q


def cross_head_rules(rank, world):
    """This rank's heads through the (possibly swapped-in) rules -> Token Sparse budgets, compaction budgets."""
    import compaction
    import token_sparse
    scores, k, v, q = cross_head_inputs()
    h, hk, hq = scores.shape[1] // world, k.shape[1] // world, q.shape[1] // world
    heads = slice(rank * h, (rank + 1) * h)
    ts = [token_sparse.coverage_budget(scores[:, heads], 0.2, 2, rule) for rule in token_sparse.COVERAGE_RULES]
    c = compaction.compact_cache(k[:, rank * hk:(rank + 1) * hk], v[:, rank * hk:(rank + 1) * hk],
                                 q[:, rank * hq:(rank + 1) * hq], 6, budget_mode="error")
    return ts, c.budget.tolist()


def cli_text(ckpt):
    """What `generate.py --checkpoint ckpt CLI...` prints on stdout (the generated text)."""
    import generate
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        generate.main(["--checkpoint", str(ckpt), *CLI])
    return out.getvalue()


def _rank(rank, world, ckpt, out_dir):
    import torch.distributed as dist
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        tp.init("cpu")
        model = tp.from_pretrained(ckpt, rank, world)
        os.environ["WORLD_SIZE"] = str(world)  # what torchrun sets: generate.py splits the heads (its group exists)
        sharded = tp.shard(load_model(ckpt), rank, world)  # cut in memory, as bench.py does
        torch.save({"decoded": decode_all(model), "sharded": decode_all(sharded, ["retro"]),
                    "rules": cross_head_rules(rank, world),
                    "heads": (model.args.n_heads, model.args.n_kv_heads), "cli": cli_text(ckpt)},
                   out_dir / f"rank{rank}.pt")
    except BaseException:
        (out_dir / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(ckpt, out_dir, timeout_s=120):
    ctx = mp.start_processes(_rank, args=(WORLD, ckpt, out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.time() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import write_byte_tokenizer  # (here: the spawned ranks need not import pytest's helpers)
    path = tmp_path_factory.mktemp("tp_ckpt")
    save_model(tiny_model(), path)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def ranks(checkpoint, tmp_path_factory):
    return run_ranks(checkpoint, tmp_path_factory.mktemp("tp_run"))


def test_two_ranks_decode_every_method_like_one(checkpoint, ranks):
    one = decode_all(load_model(checkpoint))
    assert len({tuple(one[m]) for m in RUNS}) > 1  # the methods read different keys: the comparison means something
    for r, got in enumerate(ranks):
        assert got["heads"] == (2, 1)
        for m in RUNS + ["kept"]:
            assert got["decoded"][m] == one[m], f"rank {r}, {m}"
        assert got["sharded"]["retro"] == one["retro"], f"rank {r}, tp.shard"
    assert min(one["kept"].values()) < 1  # Token Sparse dropped tokens, by the rule over all heads


def test_generate_cli_under_two_ranks_prints_what_one_prints(checkpoint, ranks):
    one = cli_text(checkpoint)
    assert len(one) > 0 and ranks[0]["cli"] == one


def test_cross_head_rules_see_every_rank(ranks):
    ts_one, budget_one = cross_head_rules(0, 1)
    assert len(set(map(tuple, budget_one))) == 1 and len(set(budget_one[0])) > 1  # the error rule moved budget
    for r, got in enumerate(ranks):
        ts, budget = got["rules"]
        assert ts == ts_one, f"rank {r}: Token Sparse budgets"
        assert budget[0] == budget_one[0][r * 2:(r + 1) * 2], f"rank {r}: compaction budgets"


def test_loader_reads_each_rank_its_slice(checkpoint):
    full = dict(load_model(checkpoint).named_parameters())
    for rank in range(WORLD):
        model = tp.from_pretrained(checkpoint, rank, WORLD)
        for name, p in model.named_parameters():
            s = tp.part(name, full[name].shape, rank, WORLD)
            want = full[name] if s is None else full[name].narrow(*s)
            assert torch.equal(p, want), name
            # its own storage, the size of the slice: no full copy kept behind a view
            assert p.untyped_storage().nbytes() == want.numel() * want.element_size(), name
        assert (model.args.n_heads, model.args.n_kv_heads, model.args.hidden_dim) == (2, 1, 48)


def test_shard_in_memory_equals_loaded_slice(checkpoint):
    model = tp.shard(load_model(checkpoint), 1, WORLD)
    loaded = dict(tp.from_pretrained(checkpoint, 1, WORLD).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, loaded[name]), name


@pytest.mark.parametrize("shape, world, message", [
    (dict(n_heads=6, n_kv_heads=2), 4, "6 query heads (num_attention_heads in"),
    (dict(n_heads=6, n_kv_heads=3), 2, "3 KV heads (num_key_value_heads in"),
    (dict(hidden_dim=95), 2, "95 MLP units (intermediate_size in")])
def test_heads_that_do_not_divide_are_refused_in_one_line(tmp_path, shape, world, message):
    save_model(Transformer(ModelArgs(**{**tiny_model().args.__dict__, **shape})), tmp_path)
    with pytest.raises(ValueError) as e:
        tp.from_pretrained(tmp_path, 0, world)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("extra, message", [(1, "does not split into 2 ranks"),
                                            (2, "(its part: (17, 32)), expected (16, 32)")])
def test_tensor_of_the_wrong_size_is_refused_by_each_rank(checkpoint, tmp_path, extra, message):
    save_model(load_model(checkpoint), tmp_path)
    state = {k: v.clone() for k, v in load_safetensors(tmp_path / "model.safetensors").items()}
    name = "model.layers.1.self_attn.q_proj.weight"
    rows, cols = state[name].shape  # (32, 32): a row or two more than config.json gives
    state[name] = torch.zeros(rows + extra, cols)
    save_safetensors(state, tmp_path / "model.safetensors")
    for rank in range(WORLD):
        with pytest.raises(ValueError) as e:
            tp.from_pretrained(tmp_path, rank, WORLD)
        assert f"tensor {name!r} has shape ({rows + extra}, {cols})" in str(e.value) and message in str(e.value)
