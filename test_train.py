"""Tests of train.py (BPE trainer, data split, recall documents, a tiny training run) and eval.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import eval as evaluation
import train
from checkpoint import load_model
from tokenizer import Tokenizer

STDLIB = Path(train.stdlib_dir())
CORPUS_FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py"]


@pytest.fixture(scope="module")
def corpus():
    return [(STDLIB / f).read_text() for f in CORPUS_FILES]


@pytest.fixture(scope="module")
def ranks(corpus):
    return train.train_bpe(corpus, 600)


@pytest.fixture(scope="module")
def enc(ranks):
    return train.make_encoding(ranks)


# ----------------------------------------------------------------------------------------------
# BPE

code_like = st.sampled_from(["def f(x):\n    return x  # ok\n", "\t\t\n\n   \r\n", "if a==b:\n\tpass",
                             "日本語 テキスト", "naïve café ☕", "😀👍🏽", "'''doc'''", "0x1F 1234567 3.14e-10",
                             "    ", "\x00\x01\x7f", "a\u200bb", "TABLE[\"k3f9a\"] == \"x7q2m\""])
texts = st.lists(st.one_of(st.text(max_size=40), code_like), max_size=6).map("".join)


@settings(max_examples=200)
@given(text=texts)
def test_bpe_round_trips_any_text(enc, text):
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_bpe_ranks_are_bytes_then_merges(ranks):
    # rank b is the single byte b; every later token is two earlier tokens joined (a BPE merge),
    # and ranks are dense 0..n-1 with no token spelled twice: what tiktoken needs
    assert len(ranks) == 600
    assert sorted(ranks.values()) == list(range(600))
    for b in range(256):
        assert ranks[bytes([b])] == b
    for tok, r in ranks.items():
        if r >= 256:
            assert any(tok[:i] in ranks and tok[i:] in ranks and ranks[tok[:i]] < r and ranks[tok[i:]] < r
                       for i in range(1, len(tok)))


def test_bpe_training_is_deterministic_and_compresses(corpus, ranks, enc):
    assert train.train_bpe(corpus, 600) == ranks
    text = "".join(corpus)
    assert len(enc.encode_ordinary(text)) < len(text.encode()) / 2


def test_saved_tokenizer_loads_in_model_tokenizer(tmp_path, ranks, corpus):
    train.save_tokenizer(tmp_path, ranks)
    tok = Tokenizer(tmp_path)
    assert tok.special_tokens == {train.EOT: 600}
    assert tok.bos_id is None and tok.stop_ids == {600}
    assert tok.decode(tok.encode(corpus[0])) == corpus[0]
    assert tok.encode(corpus[0]) == train.make_encoding(ranks).encode_ordinary(corpus[0])


# ----------------------------------------------------------------------------------------------
# Data split and recall documents

def test_heldout_split_is_fixed_and_disjoint():
    files = train.load_source_files(STDLIB)
    tr, ho = train.split_files(files)
    assert {p for p, _ in tr}.isdisjoint(p for p, _ in ho)
    assert len(tr) + len(ho) == len(files)
    assert 0.005 < len(ho) / len(files) < 0.05
    assert all(train.is_heldout(p) for p, _ in ho)
    assert not any("site-packages" in p for p, _ in files)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**32), n_pairs=st.integers(1, 20), per_gap=st.integers(1, 4),
       gaps=st.lists(st.integers(0, 60), min_size=1, max_size=4), lead=st.integers(0, 30))
def test_recall_doc_is_deterministic_and_answers_are_in_the_table(enc, seed, n_pairs, per_gap, gaps, lead):
    filler = np.asarray(enc.encode_ordinary((STDLIB / "textwrap.py").read_text())[:400])
    a = train.recall_doc(seed, filler, enc.encode_ordinary, gaps, n_pairs, per_gap, lead)
    b = train.recall_doc(seed, filler, enc.encode_ordinary, gaps, n_pairs, per_gap, lead)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    ids, lookups = a
    assert len(lookups) == len(gaps) * per_gap
    text = enc.decode(ids.tolist())
    for lk in lookups:  # the table's assignment line (a lookup writes == instead of =)
        assert f'TABLE["{lk.key}"] = "{lk.value}"\n' in text
        assert enc.decode(ids[:lk.pos].tolist()).endswith(f'assert TABLE["{lk.key}"] == "')
        assert enc.decode(ids[lk.pos:lk.pos + lk.n_tokens].tolist()).startswith(lk.value + '"')
        # the value is spelled by the same tokens in the table as in the lookup, so it can be copied
        value_ids = ids[lk.pos:lk.pos + lk.n_tokens - 1].tolist()
        assert any(ids[i:i + len(value_ids)].tolist() == value_ids for i in range(lk.pos - lk.distance))
        # and so is the key: its tokens in the lookup are its tokens in the table line
        key_ids = enc.encode_ordinary(lk.key)
        assert _contains(ids[max(0, lk.pos - 12):lk.pos].tolist(), key_ids)
        assert _contains(ids[:lk.pos - lk.distance].tolist(), enc.encode_ordinary(f'TABLE["{lk.key}"] = "'))
    assert [lk.distance for lk in lookups] == sorted(lk.distance for lk in lookups)


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_recall_keys_and_values_tokenize_the_same_in_table_and_lookup(enc):
    # the split pattern cuts the quote before a key off as punctuation ('    "path": "' -> ' "' 'path' '":' ...,
    # 'TABLE["path"]' -> '["' 'path' '"]'), so the key is the same tokens in both places, whatever the merges
    assert len(set(train.KEY_WORDS)) == len(train.KEY_WORDS) == 256
    for key in train.KEY_WORDS:
        k = enc.encode_ordinary(key)
        assert _contains(enc.encode_ordinary(f'TABLE["{key}"] = "x7q2m"\n'), k)
        assert _contains(enc.encode_ordinary(f'\nassert TABLE["{key}"] == "'), k)
        # a value in the table line is the same tokens as the answer that follows the lookup
        assert _contains(enc.encode_ordinary(f'TABLE["path"] = "{key}"\n'), k)
        assert enc.encode_ordinary(f'{key}"\n')[:len(k)] == k


def test_recall_values_are_distinct_words_absent_from_the_keys():
    ids, lookups = train.recall_doc(7, np.zeros(600, dtype=np.int64), lambda s: [ord(c) for c in s], [100, 100],
                                    n_pairs=16, lookups_per_gap=4)
    text = "".join(chr(i) for i in ids if i >= 32 or i == 10)
    table = dict(line[len('TABLE["'):-1].split('"] = "') for line in text.splitlines() if '"] = "' in line)
    assert len(table) == 16 and len(set(table.values())) == 16 and not set(table) & set(table.values())
    assert all(table[lk.key] == lk.value for lk in lookups)


def test_several_data_dirs_and_a_size_cap(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, names in ((a, ["x.py", "y.py"]), (b, ["z.py", "sub/w.py"])):
        for n in names:
            (d / n).parent.mkdir(parents=True, exist_ok=True)
            (d / n).write_text(f"# {n}\n" + "pass\n" * 100)
    assert train.parse_data_dirs([f"{a},{b}"]) == train.parse_data_dirs([str(a), str(b)]) == [str(a), str(b)]
    assert train.parse_data_dirs(None) == [train.stdlib_dir()]
    files = train.load_data_dirs([a, b])
    assert [p for p, _ in files] == ["sub/w.py", "x.py", "y.py", "z.py"]
    capped = train.load_data_dirs([a, b], max_mb=1e-6)
    assert len(capped) == 1 and capped == train.load_data_dirs([a, b], max_mb=1e-6)


def test_recall_suite_and_training_sequences(enc):
    stream = np.asarray(enc.encode_ordinary((STDLIB / "textwrap.py").read_text()), dtype=np.uint16)
    s1 = train.recall_suite(stream, enc.encode_ordinary, distances=(64, 256), n_per_distance=3, n_pairs=4)
    s2 = train.recall_suite(stream, enc.encode_ordinary, distances=(64, 256), n_per_distance=3, n_pairs=4)
    assert [d for d, _, _ in s1] == [64] * 3 + [256] * 3
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(s1, s2))
    assert all(d <= lk.distance < d + 30 for d, _, lk in s1)
    rng = np.random.default_rng(0)
    for length in (65, 257, 1025):
        assert len(train.sample_recall_sequence(rng, stream, enc.encode_ordinary, length)) == length


# ----------------------------------------------------------------------------------------------
# A tiny training run, then eval.py on what it wrote

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    for f in ["json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py", "string.py", "bisect.py",
              "heapq.py", "colorsys.py", "keyword.py", "this.py"]:
        (data / f.replace("/", "_")).write_text((STDLIB / f).read_text())
    out = tmp_path_factory.mktemp("ckpt")
    summary = train.main(["--out", str(out), "--data", str(data), "--preset", "tiny", "--vocab-size", "320",
                          "--dim", "32", "--n-layers", "1", "--hidden-dim", "64", "--seq-len", "128",
                          "--batch-size", "8", "--max-steps", "40", "--warmup", "5", "--lr", "3e-3",
                          "--log-every", "1", "--eval-every", "1000", "--max-minutes", "5", "--reserve-seconds", "5"])
    return out, summary


def test_tiny_training_reduces_loss_and_saves_a_loadable_checkpoint(tiny_run):
    out, s = tiny_run
    losses = [h["loss"] for h in s["history"]]
    assert s["steps"] == 40
    assert np.mean(losses[-5:]) < losses[0] - 0.5
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config_nanokv.json",
                 "README.md", "train_log.json"):
        assert (out / name).is_file(), name
    model = load_model(out)
    assert model.args.vocab_size == 320 and model.args.max_seq_len == 128
    assert next(model.parameters()).dtype == torch.float32
    header = json.loads((out / "model.safetensors").read_bytes()[8:][:2000].split(b"}}")[0] + b"}}")
    assert header["lm_head.weight"]["dtype"] == "BF16"
    assert "python train.py" in (out / "README.md").read_text()


def test_eval_dense_through_the_cache_matches_sdpa(tiny_run):
    out, s = tiny_run
    data = s["data_dir"]
    common = ["--model", str(out), "--data", data, "--contexts", "64", "128", "--distances", "16",
              "--n-windows", "2", "--n-recall", "3", "--device", "cpu"]
    dense = evaluation.main(common + ["--method", "dense"])
    sdpa = evaluation.main(common + ["--method", "sdpa"])
    decode = evaluation.main(common + ["--method", "dense", "--score-chunk", "1", "--contexts", "64"])
    for c in (64, 128):
        assert dense["loss"][c]["loss"] == pytest.approx(sdpa["loss"][c]["loss"], abs=1e-4)
    assert decode["loss"][64]["loss"] == pytest.approx(sdpa["loss"][64]["loss"], abs=1e-4)
    assert dense["recall"][16]["n"] == 3
    assert dense["recall"][16]["accuracy"] == sdpa["recall"][16]["accuracy"]


def test_eval_sweep_runs_each_method_and_saves_after_each_run(tiny_run, tmp_path, monkeypatch):
    out, s = tiny_run
    saved = []  # the rows in the JSON file each time it is written
    write = Path.write_text

    def spy(path, text, *a, **k):
        if path.suffix == ".json":
            saved.append(len(json.loads(text)["rows"]))
        return write(path, text, *a, **k)
    monkeypatch.setattr(Path, "write_text", spy)
    r = evaluation.main(["--sweep", "--model", str(out), "--data", s["data_dir"], "--budgets", "32", "--windows", "2",
                         "--coverages", "--ratios", "--contexts", "64", "--n-windows", "1", "--distances", "16",
                         "--n-recall", "1", "--gen-prompt", "64", "--gen-new", "8", "--device", "cpu",
                         "--out", str(tmp_path / "sweep.json")])
    assert [row["run"] for row in r["rows"]] == ["dense", "quest b=32", "retro b=32 w=2"]
    assert r["rows"][0]["match_rate"] == 1.0 and r["rows"][0]["first_divergence"] == 8
    assert saved == [1, 2, 3]  # a sweep stopped midway keeps the runs it finished
    assert json.loads((tmp_path / "sweep.json").read_text())["complete"] is True
    # the same sweep in two shards, merged: the same rows in the same order
    common = ["--sweep", "--model", str(out), "--data", s["data_dir"], "--budgets", "32", "--windows", "2",
              "--coverages", "--ratios", "--contexts", "64", "--n-windows", "1", "--distances", "16",
              "--n-recall", "1", "--gen-prompt", "64", "--gen-new", "8", "--device", "cpu"]
    for k in range(2):
        evaluation.main(common + ["--shard", f"{k}/2", "--out", str(tmp_path / f"shard{k}.json")])
    merged = evaluation.main(["--merge", str(tmp_path / "shard0.json"), str(tmp_path / "shard1.json"),
                              "--out", str(tmp_path / "merged.json")])
    drop = ("seconds",)
    assert [{k: v for k, v in row.items() if k not in drop} for row in merged["rows"]] == \
        [{k: v for k, v in row.items() if k not in drop} for row in r["rows"]]
    assert merged["complete"] is True and json.loads((tmp_path / "merged.json").read_text())["rows"][1]["index"] == 1
    assert evaluation.main(["--merge", str(tmp_path / "shard1.json")])["complete"] is False  # run 0 missing
    with pytest.raises(SystemExit):
        evaluation.main(common + ["--shard", "2/2"])


def test_eval_sweep_records_what_compaction_cannot_fit(tiny_run, tmp_path):
    """A 64-token prompt's repeat-prefill (2 x 63 + separator) exceeds the tiny model's 128 positions:
    the long generation is skipped with the reason, the loss of 64-token windows (32-token prefills) is not."""
    out, s = tiny_run
    r = evaluation.main(["--sweep", "--model", str(out), "--data", s["data_dir"], "--budgets", "--windows",
                         "--coverages", "--ratios", "4", "--contexts", "64", "--n-windows", "1", "--distances", "16",
                         "--n-recall", "1", "--gen-prompt", "64", "--gen-new", "8", "--device", "cpu"])
    compact = r["rows"][1]
    assert compact["run"] == "compact r=4.0" and compact["loss@64"] is not None
    assert "repeat-prefill" in compact["skipped"]["long generation"] and "match_rate" not in compact
    assert r["rows"][0]["match_rate"] == 1.0
