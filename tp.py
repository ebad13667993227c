"""
Tensor parallelism by heads: one model on N GPUs, each holding 1/N of every layer (Megatron-LM's
column and row parallel layers, Shoeybi et al., arXiv 1909.08053; gpt-fast's tp.py for dense decoding).

    attention:  q, k, v = x Wq[:, r], x Wk[:, r], x Wv[:, r]    column parallel: rank r's heads only
                y       = all_reduce_sum over r of  attn(q, k, v) Wo[r, :]     row parallel
    MLP:        y       = all_reduce_sum over r of  (silu(x Wgate[:, r]) * x Wup[:, r]) Wdown[r, :]

(W[:, r]: rank r's output columns, W[r, :]: the matching input rows.) A layer costs two
all-reduces of B x T x dim numbers, one after o_proj and one after down_proj; the embedding,
the norms and lm_head are replicated, so after each all-reduce every rank holds the same hidden
state, computes the same logits and samples the same token: nothing else is exchanged.

Rank r holds query heads [r Hq/N, (r+1) Hq/N) and KV heads [r Hkv/N, (r+1) Hkv/N): a GQA group never
spans two ranks. So its KV cache, Quest page bounds, Retro output cache and compacted keys are
those of its heads, and each attention object runs unchanged on them (generate.py builds them from
model.args, which shard() sets to one rank's head counts). Two rules look across the heads of a
layer and would see only a rank's share: Token Sparse's coverage (the authors' rule averages the
heads' scores, then normalizes) and compaction's error-driven budgets (a layer's total shared out
by error). init() swaps them for versions that first gather every rank's heads, then keep this
rank's part of the answer, so N ranks decide what one does.

Why a file: it is one idea (what a split by heads costs and why every method survives it), and it
changes the model from outside, as gpt-fast's tp.py does: model.py and the method files never
mention it. Run: torchrun --nproc-per-node 2 generate.py --method retro (NCCL on GPUs, gloo on CPUs).
"""

import atexit
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
import compaction
import token_sparse

# the dimension of W (HF layout: (out_features, in_features)) each kind of projection is split along
SPLIT_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0,  # column parallel
             "o_proj": 1, "down_proj": 1}                                            # row parallel


def check_divisible(args, world, source="config.json"):
    """The head counts and the MLP width must split evenly into `world` ranks."""
    for what, key, n in (("query heads", "num_attention_heads", args.n_heads),
                         ("KV heads", "num_key_value_heads", args.n_kv_heads),
                         ("MLP units", "intermediate_size", args.hidden_dim)):
        if n % world:
            raise ValueError(f"tensor parallel: {n} {what} ({key} in {source}) do not split into {world} ranks "
                             f"(--nproc-per-node must divide {n})")


def part(name, shape, rank, world):
    """(dim, start, length): the slice of tensor `name` (full shape) that rank holds, None if replicated."""
    kind = name.split(".")[-2]
    if kind not in SPLIT_DIM:
        return None
    dim = SPLIT_DIM[kind]
    n = shape[dim] // world  # Hq * D / N rows of q_proj: whole heads, since N divides Hq
    return dim, rank * n, n


def rank_args(args, world, source="config.json"):
    """The ModelArgs of one rank's share: what its modules, KV cache and method state are built from."""
    check_divisible(args, world, source)
    return replace(args, n_heads=args.n_heads // world, n_kv_heads=args.n_kv_heads // world,
                   hidden_dim=args.hidden_dim // world)


def _all_reduce(module, inputs, output):
    dist.all_reduce(output)  # in place: the sum over ranks of their partial products


def _add_all_reduces(model, rank, world):
    if world > 1:  # hooks on the Linear modules themselves survive cudagraph.fuse_kernels' MLP swap
        for layer in model.layers:
            layer.self_attn.o_proj.register_forward_hook(_all_reduce)
            layer.mlp.down_proj.register_forward_hook(_all_reduce)
    model.tp = (rank, world)
    return model


def shard(model, rank, world):
    """Cut a full model in memory down to rank's share, in place (bench.py's random model)."""
    model.args = rank_args(model.args, world, source="model.args")
    for name, p in list(model.named_parameters()):
        s = part(name, p.shape, rank, world)
        if s is not None:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.weight = nn.Parameter(p.detach().narrow(*s).clone(), requires_grad=False)  # the rest is freed
            module.out_features, module.in_features = module.weight.shape
    for layer in model.layers:
        layer.self_attn.n_heads, layer.self_attn.n_kv_heads = model.args.n_heads, model.args.n_kv_heads
    return _add_all_reduces(model, rank, world)


def from_pretrained(path, rank, world, dtype=torch.float32, device="cpu", max_seq_len=None):
    """checkpoint.load_model for one rank: the model is built at the rank's shapes, and each tensor,
    a view of the memory-mapped safetensors, is narrowed to the rank's slice before it is copied to
    the device. The rank copies its slice only and reads only the file pages it lies on
    (q/k/v/gate/up: a block of rows; o_proj/down_proj: a stretch of every row)."""
    def rank_slice(name, t):
        s = part(name, t.shape, rank, world)
        if s is not None and s[2] * world != t.shape[s[0]]:  # (a tensor a row too long would slice as well)
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}: "
                             f"it does not split into {world} ranks")
        return t if s is None else t.narrow(*s)
    model = checkpoint.load_model(path, dtype, device, max_seq_len, part=rank_slice,
                                  shapes=lambda args: rank_args(args, world, source=str(Path(path) / "config.json")))
    return _add_all_reduces(model, rank, world)


# ----------------------------------------------------------------------------------------------
# The rules that look across a layer's heads: all ranks' heads gathered, in rank order

def gather_heads(x):
    """x (B, H_rank, ...) on every rank -> (B, H_rank * N, ...): all ranks' heads, rank 0's first."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 1)


_coverage_budget, _budget_from_error = token_sparse.coverage_budget, compaction._budget_from_error


def coverage_budget(scores, *args, **kwargs):
    """token_sparse.coverage_budget over the heads of all ranks (its budgets are one per batch row)."""
    return _coverage_budget(gather_heads(scores), *args, **kwargs)


def budget_from_error(err, budget, T):
    """compaction._budget_from_error over the KV heads of all ranks -> this rank's heads' budgets."""
    h, r = err.shape[1], dist.get_rank()
    return _budget_from_error(gather_heads(err), gather_heads(budget), T)[:, r * h:(r + 1) * h]


def init(device="cuda"):
    """Join the torchrun group (NCCL on GPUs, gloo on CPUs), one GPU per local rank; swap in the
    cross-head rules; silence every rank but 0. -> (rank, world). Call before loading the model."""
    if not dist.is_initialized():  # (a test may have joined a group of its own)
        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise SystemExit(f"error: local rank {local} has no GPU ({torch.cuda.device_count()} visible): "
                                 f"--nproc-per-node must not exceed the GPUs of a node")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device == "cuda" else "gloo")  # torchrun's RANK, WORLD_SIZE, MASTER_*
        atexit.register(dist.destroy_process_group)  # (NCCL asks for it before exit)
    rank, world = dist.get_rank(), dist.get_world_size()
    token_sparse.coverage_budget, compaction._budget_from_error = coverage_budget, budget_from_error
    if rank:  # the ranks compute the same tokens: rank 0 prints them
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return rank, world
