"""Tests of ruler.py: the generated prompts hold their answers where they say, the scorer accepts the
right answer and rejects a wrong one, and the intervals match cases computed by hand.

Tokenizers: the default model's (code style, committed) and a byte tokenizer (prose style), so no
model runs here; eval.py's --ruler loop is tested in test_eval.py on the tiny random model.
"""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ruler
from conftest import write_byte_tokenizer
from tokenizer import Tokenizer

CODE_TOKENIZER = Path(__file__).parent / "models" / "nanokv-code-4k"


@pytest.fixture(scope="module")
def code_tok():
    return Tokenizer(CODE_TOKENIZER)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte_tok")
    write_byte_tokenizer(path)
    return Tokenizer(path)


@pytest.fixture(scope="module")
def code_stream(code_tok):
    """A stand-in haystack of code: this test file's own source, repeated."""
    ids = code_tok.encode(Path(__file__).read_text())
    return np.asarray(ids * (4096 // len(ids) + 2), dtype=np.int64)


def sample(tok, stream, task, style, context, depth, seed=0):
    return ruler.make_sample(tok, task, style, context, depth, seed, stream if style == "code" else None)


# ----------------------------------------------------------------------------------------------
# Generators

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_sits_at_its_depth_and_prompt_fills_the_context(code_tok, code_stream, task, depth):
    s = sample(code_tok, code_stream, task, "code", 1024, depth)
    assert len(s.ids) + s.n_new == 1024  # prompt + answer tokens: exactly the context
    for pos, needle in zip(s.needle_pos, s.needles):
        assert list(s.ids[pos:pos + len(needle)]) == needle
    # the asked needle (first) after depth * haystack tokens, moved back at most SNAP to a line end
    intro = len(code_tok.encode(ruler.CODE["mv_intro" if task == "niah_multivalue" else
                                          "vt_intro" if task == "vt" else "niah_intro"]))
    n_haystack = len(s.ids) - intro - sum(len(n) for n in s.needles) - s.question_len
    before = s.needle_pos[0] - intro - sum(len(n) for p, n in zip(s.needle_pos, s.needles) if p < s.needle_pos[0])
    assert round(depth * n_haystack) - ruler.SNAP <= before <= round(depth * n_haystack)
    # the asked needle holds every answer that is a value (vt: its first assignment holds the first name)
    text = code_tok.decode(s.needles[0])
    assert ruler.found(text, s.answers[0])


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_every_answer_is_in_the_prompt_once_per_needle(byte_tok, task):
    s = sample(byte_tok, None, task, "prose", 1500, 0.5)
    prompt = byte_tok.decode(list(s.ids))
    needles = " ".join(byte_tok.decode(n) for n in s.needles)
    for a in s.answers:
        assert ruler.found(needles, a)
    assert len(s.ids) + s.n_new == 1500
    if task != "vt":  # a value is in its needle and nowhere else (vt's names recur in the next hop)
        for a in s.answers:
            assert prompt.count(a) == 1


def test_vt_chain_is_in_order(byte_tok):
    s = sample(byte_tok, None, "vt", "prose", 1500, 0.2)
    assert s.needle_pos == sorted(s.needle_pos)
    texts = [byte_tok.decode(n) for n in s.needles]
    value = texts[0].split("= ")[1].rstrip(".")
    assert value in byte_tok.decode(list(s.ids[-s.question_len:]))  # the question names the value
    for prev, hop, name in zip(s.answers, texts[1:], s.answers[1:]):
        assert hop.strip() == f"VAR {name} = VAR {prev}."


@pytest.mark.parametrize("style", ["prose", "code"])
def test_cwe_answer_is_the_most_common_words(code_tok, byte_tok, code_stream, style):
    tok = code_tok if style == "code" else byte_tok
    s = sample(tok, code_stream, "cwe", style, 2048, 0.0)
    assert len(s.ids) + s.n_new <= 2048
    entry = '"' if style == "code" else ". "
    body = tok.decode(list(s.ids[:len(s.ids) - s.question_len]))
    words = [line.split(entry)[1].rstrip('",') for line in body.splitlines()
             if entry in line and (style == "code" or line.split(". ")[0].isdigit())]
    counts = Counter(words).most_common()
    top = {w for w, _ in counts[:10]}
    assert top == set(s.answers) and counts[9][1] > counts[10][1]


@pytest.mark.parametrize("style", ["prose", "code"])
def test_fwe_answer_is_the_three_most_frequent(code_tok, byte_tok, code_stream, style):
    tok = code_tok if style == "code" else byte_tok
    s = sample(tok, code_stream, "fwe", style, 1024, 0.0)
    intro = len(tok.encode((ruler.CODE if style == "code" else ruler.PROSE)["fwe_intro"]))
    words = tok.decode(list(s.ids[intro:len(s.ids) - s.question_len])).split()
    counts = Counter(words).most_common()
    assert [w for w, _ in counts[:3]] == s.answers and counts[2][1] > counts[3][1]


def test_samples_are_deterministic_and_differ_by_seed(code_tok, code_stream):
    a = sample(code_tok, code_stream, "niah_multikey", "code", 1024, 0.5, seed=1)
    b = sample(code_tok, code_stream, "niah_multikey", "code", 1024, 0.5, seed=1)
    c = sample(code_tok, code_stream, "niah_multikey", "code", 1024, 0.5, seed=2)
    assert np.array_equal(a.ids, b.ids) and a.answers == b.answers
    assert a.answers != c.answers or not np.array_equal(a.ids, c.ids)


def test_bad_input_names_the_problem(code_tok, code_stream):
    with pytest.raises(ValueError, match="unknown RULER task 'niah'"):
        sample(code_tok, code_stream, "niah", "code", 1024, 0.5)
    with pytest.raises(ValueError, match="too short"):
        sample(code_tok, code_stream, "niah_multiquery", "code", 40, 0.5)


# ----------------------------------------------------------------------------------------------
# Scoring

def test_scorer_accepts_the_right_answer_and_rejects_a_wrong_one(code_tok, code_stream):
    s = sample(code_tok, code_stream, "niah_single", "code", 1024, 0.5)
    assert ruler.score(f'{s.answers[0]}"\nassert TABLE', s.answers) == 1
    assert ruler.score('path"\nassert TABLE', ["pathname"]) == 0
    assert ruler.score("The special magic number is 1234567.", ["1234567"]) == 1
    assert ruler.score("The special magic number is 12345678.", ["1234567"]) == 0  # not inside a longer number
    assert ruler.score("They are: ABCDE, FGHIJ", ["abcde", "fghij"]) == 1  # case-insensitive
    assert ruler.score("They are: ABCDE", ["ABCDE", "FGHIJ"]) == 0  # all or nothing
    assert ruler.score("face_0 and wine_1", ["face_0", "wine_1"]) == 1
    assert ruler.score("face_01", ["face_0"]) == 0


# ----------------------------------------------------------------------------------------------
# Intervals

def test_wilson_45_of_50_by_hand():
    # p = 0.9, z = 1.96, z^2 = 3.8416, n = 50: denominator 1 + z^2/n = 1.076832;
    # center (0.9 + 3.8416/100) / 1.076832 = 0.938416 / 1.076832 = 0.871461;
    # half-width 1.96 * sqrt(0.9*0.1/50 + 3.8416/10000) / 1.076832 = 1.96 * sqrt(0.00218416) / 1.076832
    #            = 1.96 * 0.0467350 / 1.076832 = 0.085065  ->  [0.786396, 0.956526]
    lo, hi = ruler.wilson(45, 50, z=1.96)
    assert lo == pytest.approx(0.786396, abs=2e-6) and hi == pytest.approx(0.956526, abs=2e-6)


def test_wilson_edges():
    # 0/n: the interval is [0, z^2 / (n + z^2)]; for n = 10: 3.8416 / 13.8416 = 0.277540
    assert ruler.wilson(0, 10, z=1.96) == pytest.approx((0.0, 0.277540), abs=2e-6)
    lo, hi = ruler.wilson(10, 10, z=1.96)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.277540, abs=2e-6)
    with pytest.raises(ValueError, match="wilson"):
        ruler.wilson(3, 2)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.data())
def test_wilson_contains_the_estimate_and_narrows_with_n(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = ruler.wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1
    lo4, hi4 = ruler.wilson(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo


def test_bootstrap_by_hand():
    # two values 0 and 1: a resample's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles of the resampled means are 0 and 1
    mean, lo, hi = ruler.bootstrap([0.0, 1.0], n_boot=4000, seed=0)
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    # a constant: every resample has the same mean
    assert ruler.bootstrap([0.3] * 7) == pytest.approx((0.3, 0.3, 0.3))


def test_bootstrap_matches_the_normal_interval_of_a_mean():
    # 400 values, half 0 and half 1: mean 0.5, standard error sqrt(0.25 / 400) = 0.025, so the
    # interval is about 0.5 -+ 1.96 * 0.025 = [0.451, 0.549]
    mean, lo, hi = ruler.bootstrap([0.0, 1.0] * 200, n_boot=4000, seed=1)
    assert mean == 0.5 and lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)


def test_paired_difference_removes_shared_variation():
    rng = np.random.default_rng(0)
    prompt = rng.normal(0, 1, 40)  # prompt-to-prompt variation both methods share
    a, b = prompt + 0.1, prompt
    d, lo, hi = ruler.paired_difference(a, b)
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    # unpaired, the same data give an interval of width ~ 2 * 1.96 * sqrt(2 / 40) ~ 1.2
    _, ua, ub = ruler.bootstrap(a)
    assert ub - ua > 0.3
    with pytest.raises(ValueError, match="same prompts"):
        ruler.paired_difference([1, 2], [1, 2, 3])


def test_a_cell_shares_one_prompt_length_and_answer_length(code_tok, code_stream):
    """suite() draws a cell's samples so that they can run as one batch: NIAH and vt prompts of one
    length, each of exactly context - n_new tokens, and the answer still in each."""
    cells = ruler.suite(code_tok, ["niah_single", "niah_multikey", "vt"], "code", [600], 5, code_stream)
    for (task, c), samples in cells.items():
        assert len({len(s.ids) for s in samples}) == 1 and len({s.n_new for s in samples}) == 1, task
        for s in samples:
            assert len(s.ids) + s.n_new == c
            assert s.n_new >= ruler.answer_tokens(code_tok, s.answers)
            for at, needle in zip(s.needle_pos, s.needles):
                assert list(s.ids[at:at + len(needle)]) == needle
