"""
RULER-style long-context tasks, generated here, and the intervals that make their scores a claim.

Why a file of its own: the attention methods trade accuracy for a smaller KV budget, and the papers
measure that trade on RULER (Hsieh et al., arXiv 2404.06654): synthetic prompts of an exact length
whose answer is known, so that a score depends on the context length and nothing else. This file is
the data, the scoring and the run of every method at two KV budgets (`eval.py --ruler` loads the
model, loops over the cells and saves). A score from a few dozen prompts is only a claim together
with its uncertainty, so the intervals live here too (section "Intervals"), and every table of
eval.py and longgen.py uses them.

The tasks (RULER Sec. 3; the prompts follow its task definitions, in our own words):

    niah_single     one needle "the special magic number for KEY is VALUE" in a haystack; ask for KEY
    niah_multikey   the same, plus needles of other keys (distractors)
    niah_multivalue one key with several values in several needles; ask for all of them
    niah_multiquery several keys, one needle each; ask for all of their values
    vt              variable tracking: X1 = VALUE, X2 = X1, ... (one hop per needle); ask which
                    variables hold VALUE
    cwe             common words: a numbered list where 10 words appear far more often than the
                    rest; ask for those 10
    fwe             frequent words: coded words drawn from a Zipf distribution (alpha 2); ask for
                    the 3 most frequent

Two styles of the same tasks: "prose" (RULER's wording, for a chat/instruct model; the haystack is
the classic repeated noise paragraph) and "code" (for a model trained on Python, like nanokv's
default model: the haystack is held-out code and the needle is a line the model knows,
`TABLE["key"] = "value"`, asked as `assert TABLE["key"] == "`).

A sample is correct when every expected answer occurs in the decoded text as a whole word
(case-insensitive): RULER's string_match_all, counted all-or-nothing, so that a cell is a binomial
count and its 95% interval is Wilson's.
"""

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from generate import generate

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
STYLES = ("prose", "code")
SNAP = 64  # a needle goes after the last line/sentence end at most this many tokens before its depth

# Words for keys, values and word lists: short, common, one or two tokens in most vocabularies.
WORDS = tuple("""
able acid aged army away baby back ball band bank base bath bear beat bell belt bird blow blue boat
body bone book boot born boss bowl bulk burn bush busy cafe cake calm camp card care cart case cash
cast cell chef chip city clay club coal coat code cold cook cool copy corn cost crew crop dark data
dawn deal deck deep deer desk diet dish disk dock door dose down draw drop drum duck dust duty earn
east easy edge face fact fair fall farm fast fear feed film fire firm fish flag flat flow folk food
foot fork form fort frog fuel gain game gate gear gift girl glad goal gold golf good grey grid grip
hall hand harm hawk head heat herb hero hill hole home hook horn host hour idea iron item jazz joke
jump jury keen kind king kite knee lake lamp land lane lawn leaf lens life lift lime lion list loan
lock loop lord luck mail male mask meal meat menu mild milk mill mind mint mist moon moss nest news
note oven pace pack page pain pair palm park path peak pear pine pink plan plot pond pool port pump
rail rain ramp rice ring road rock roof room root rope rose ruby sail salt sand seat seed ship shoe
shop silk sink site skin snow sock soil song soup star step stem tank tape task taxi team tent test
tide tile tool tour town tree trip tube tune vase vest view vote wall wave weed well wind wine wing
wire wolf wood wool yard year zone
""".split())


# ----------------------------------------------------------------------------------------------
# Templates: what a needle, the instruction and the question say, in each style

PROSE = {
    "noise": " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "niah_intro": "Some special magic numbers are hidden within the following text. Make sure to memorize "
                  "them. I will quiz you about the numbers afterwards.\n",
    "needle": " One of the special magic numbers for {key} is: {value}.",
    "q_one": "\nWhat is the special magic number for {key} mentioned in the provided text? "
             "The special magic number for {key} mentioned in the provided text is",
    "q_all": "\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
             "The special magic numbers for {key} mentioned in the provided text are",
    "vt_intro": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n",
    "vt_first": " VAR {name} = {value}.",
    "vt_hop": " VAR {name} = VAR {prev}.",
    "vt_q": "\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
            "According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
            "the value {value}, they are:",
    "cwe_intro": "Below is a numbered list of words. In these words, some appear more often than others. "
                 "Memorize the ones that appear most often.\n",
    "cwe_entry": "{i}. {word}\n",
    "cwe_q": "Question: What are the {n} most common words in the above list? Answer: The top {n} words "
             "that appear most often in the list are:",
    "fwe_intro": "Read the following coded text and track the frequency of each coded word. Find the three "
                 "most frequently appeared coded words.\n",
    "fwe_entry": " {word}",
    "fwe_q": "\nQuestion: What are the three most frequently appeared words in the above coded text? Answer: "
             "According to the coded text above, the three most frequently appeared words are:",
}

CODE = {
    "niah_intro": "TABLE = {}\n",
    "needle": 'TABLE["{key}"] = "{value}"\n',
    "mv_intro": "VALUES = collections.defaultdict(list)\n",
    "mv_needle": 'VALUES["{key}"].append("{value}")\n',
    "q_one": '\nassert TABLE["{key}"] == "',
    "q_mv": '\nassert VALUES["{key}"] == ["',
    "q_mq": "\nassert ({lookups}) == (\"",
    "vt_intro": "",
    "vt_first": '{name} = "{value}"\n',
    "vt_hop": "{name} = {prev}\n",
    "vt_q": '\nnames = [k for k, v in dict(globals()).items() if v == "{value}"]  # {n} names\nassert names == ["',
    "cwe_intro": "WORDS = [\n",
    "cwe_entry": '    "{word}",\n',
    "cwe_q": "]\n# the {n} most common words of WORDS, most common first\nassert top(WORDS, {n}) == [\"",
    "fwe_intro": 'CODED = """\n',
    "fwe_entry": " {word}",
    "fwe_q": '\n"""\n# the 3 most frequent words of CODED, most frequent first\nassert top(CODED.split(), 3) == ["',
}


@dataclass
class Sample:
    task: str
    ids: np.ndarray            # (T,) int64: the prompt; it ends where the answer begins
    answers: list              # strings that must all occur in the decoded text
    n_new: int                 # tokens to decode (the answers plus some slack)
    question_len: int          # tokens at the end of ids after the context (kept whole by compaction)
    depth: float = None        # NIAH / vt: fraction of the haystack before the first needle
    needle_pos: list = field(default_factory=list)  # index in ids of each needle's first token
    needles: list = field(default_factory=list)     # each needle's token ids (to check needle_pos)


# ----------------------------------------------------------------------------------------------
# Haystacks and needles

def boundary_mask(tokenizer, filler, style):
    """(len(filler),) bool: True where a token ends a line (code) or a sentence (prose), so that a
    needle inserted after it starts a line or a sentence of its own."""
    ends = ("\n",) if style == "code" else (".", "!", "?")
    uniq = np.unique(filler)
    ok = {int(t): tokenizer.decode([int(t)]).rstrip(" ").endswith(ends) for t in uniq}
    return np.array([ok[int(t)] for t in filler], dtype=bool)


def place_needles(intro, filler, boundary, needles, depths, question, budget):
    """intro + filler with each needle inserted after depth * (filler length) filler tokens (moved back
    to a boundary within SNAP tokens if there is one) + question, budget tokens in all. The needles
    keep their order (a chain's hops stay in order: depths are sorted). -> (ids, needle_pos)."""
    n_filler = budget - len(intro) - sum(len(n) for n in needles) - len(question)
    if n_filler < 0:
        raise ValueError(f"a prompt of {budget} tokens is too short: its needles and question alone take "
                         f"{budget - n_filler}")
    if len(filler) < n_filler:
        raise ValueError(f"a prompt of {budget} tokens needs {n_filler} haystack tokens, got {len(filler)}")
    ats = []
    for d in sorted(depths):
        at = round(d * n_filler)
        for i in range(at, max(0, at - SNAP), -1):
            if boundary[i - 1]:
                at = i
                break
        ats.append(max(at, ats[-1] if ats else 0))
    pieces, pos, prev, n = [np.asarray(intro, dtype=np.int64)], [], 0, len(intro)
    for at, needle in zip(ats, needles):
        pieces.append(np.asarray(filler[prev:at], dtype=np.int64))
        n += at - prev
        pos.append(n)
        pieces.append(np.asarray(needle, dtype=np.int64))
        n += len(needle)
        prev = at
    pieces += [np.asarray(filler[prev:n_filler], dtype=np.int64), np.asarray(question, dtype=np.int64)]
    return np.concatenate(pieces), pos


def haystack_for(tokenizer, style, stream, rng, n_tokens):
    """n_tokens of filler: a random stretch of `stream` (held-out code) for code, the repeated noise
    paragraph for prose (stream unused)."""
    if style == "prose":
        one = tokenizer.encode(PROSE["noise"])
        return np.asarray(one * (n_tokens // len(one) + 1), dtype=np.int64)[:n_tokens]
    if stream is None or len(stream) < n_tokens:
        raise ValueError(f"the code haystack needs a stream of at least {n_tokens} tokens")
    off = int(rng.integers(0, len(stream) - n_tokens + 1))
    return np.asarray(stream[off:off + n_tokens], dtype=np.int64)


def distinct_words(rng, n, exclude=()):
    """n distinct words of WORDS (pairs joined by '_' when WORDS runs out), none in exclude."""
    pool = [w for w in WORDS if w not in exclude]
    if n > len(pool):
        pool = pool + [f"{a}_{b}" for a in WORDS[:60] for b in WORDS[60:120] if f"{a}_{b}" not in exclude]
    if n > len(pool):
        raise ValueError(f"{n} distinct words asked, {len(pool)} available")
    return [pool[i] for i in rng.choice(len(pool), n, replace=False)]


def number(rng):
    return str(int(rng.integers(1_000_000, 10_000_000)))  # RULER's needles: 7-digit numbers


# ----------------------------------------------------------------------------------------------
# The generators: one function per family, -> Sample of exactly `context` tokens with its answer

def niah(tokenizer, task, style, context, depth, rng, stream=None, n_new=None, n_keys=4, n_values=4, n_queries=4):
    """A needle-in-a-haystack prompt. The first needle (the one asked about) sits at `depth`; the
    others (distractors, further values, further queried keys) at random depths."""
    t = PROSE if style == "prose" else CODE
    n_needles = {"niah_single": 1, "niah_multikey": n_keys, "niah_multivalue": n_values,
                 "niah_multiquery": n_queries}[task]
    keys = distinct_words(rng, 2 * n_needles)
    if style == "prose":
        keys = [f"{a}-{b}" for a, b in zip(keys[::2], keys[1::2])]  # RULER's keys: word-word
        values = [number(rng) for _ in range(n_needles)]
    else:
        keys, values = keys[:n_needles], keys[n_needles:]  # the default model copies words, not digits
    if task == "niah_multivalue":
        keys = [keys[0]] * n_needles
    needle = t["mv_needle"] if task == "niah_multivalue" and style == "code" else t["needle"]
    needles = [tokenizer.encode(needle.format(key=k, value=v)) for k, v in zip(keys, values)]
    intro = t["mv_intro"] if task == "niah_multivalue" and style == "code" else t["niah_intro"]
    if task in ("niah_single", "niah_multikey"):
        answers = values[:1]
        question = t["q_one"].format(key=keys[0])
    elif task == "niah_multivalue":
        answers = values
        question = (t["q_mv"] if style == "code" else t["q_all"]).format(key=keys[0])
    else:
        answers = values
        question = (t["q_mq"].format(lookups=", ".join(f'TABLE["{k}"]' for k in keys)) if style == "code" else
                    t["q_all"].format(key=", ".join(keys[:-1]) + " and " + keys[-1]))
    depths = [depth] + [float(d) for d in rng.uniform(0, 1, n_needles - 1)]
    # the asked needle first in the prompt's order only if its depth is the smallest: keep track
    order = np.argsort(depths, kind="stable")
    return _assemble(tokenizer, task, style, context, rng, stream, intro, [needles[i] for i in order],
                     [depths[i] for i in order], question, answers, depth, n_new, first=int(np.flatnonzero(order == 0)[0]))


def variable_tracking(tokenizer, style, context, depth, rng, stream=None, n_new=None, n_hops=4):
    """RULER's vt with one chain: VAR X1 = VALUE, then X2 = X1, ..., n_hops hops, the first at
    `depth` and the rest after it; the answer is all n_hops + 1 names."""
    t = PROSE if style == "prose" else CODE
    value = number(rng) if style == "prose" else distinct_words(rng, 1)[0]
    if style == "prose":
        names = ["".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, 5)) for _ in range(n_hops + 1)]
    else:
        names = [f"{w}_{i}" for i, w in enumerate(distinct_words(rng, n_hops + 1))]
    texts = [t["vt_first"].format(name=names[0], value=value)]
    texts += [t["vt_hop"].format(name=names[i], prev=names[i - 1]) for i in range(1, n_hops + 1)]
    needles = [tokenizer.encode(x) for x in texts]
    depths = [depth] + sorted(float(d) for d in rng.uniform(depth, 1, n_hops))
    question = t["vt_q"].format(value=value, n=n_hops + 1)
    return _assemble(tokenizer, "vt", style, context, rng, stream, t["vt_intro"], needles, depths, question,
                     names, depth, n_new)


def _assemble(tokenizer, task, style, context, rng, stream, intro, needles, depths, question, answers, depth,
              n_new=None, first=0):
    n_new = answer_tokens(tokenizer, answers, n_new)
    intro, question = tokenizer.encode(intro) if intro else [], tokenizer.encode(question)
    filler = haystack_for(tokenizer, style, stream, rng, context)
    ids, pos = place_needles(intro, filler, boundary_mask(tokenizer, filler, style), needles, depths, question,
                             context - n_new)
    if first:  # the asked needle first in the lists
        pos = [pos[first]] + pos[:first] + pos[first + 1:]
        needles = [needles[first]] + needles[:first] + needles[first + 1:]
    return Sample(task, ids, list(answers), n_new, len(question), depth, pos, [list(n) for n in needles])


def answer_tokens(tokenizer, answers, at_least=None):
    """Tokens to decode: the answers' tokens with a separator each (', "') plus 4 of slack, or
    at_least if that is more (suite(): one answer length per cell)."""
    return max(at_least or 0, sum(len(tokenizer.encode(f' {a}", ')) for a in answers) + 4)


def common_words(tokenizer, style, context, rng, n_new=None, n_common=10, freq_uncommon=3):
    """RULER's cwe: a numbered list of words, each of n_common words appearing freq_common times
    and other words freq_uncommon times, as many as fit; freq_common grows with the context
    (at least 2 * freq_uncommon) so that the common words stay the most common at every length."""
    t = PROSE if style == "prose" else CODE
    common = distinct_words(rng, n_common)
    n_new = answer_tokens(tokenizer, common, n_new)
    intro = tokenizer.encode(t["cwe_intro"])
    question = tokenizer.encode(t["cwe_q"].format(n=n_common))
    room = context - n_new - len(intro) - len(question)
    per_entry = np.mean([len(tokenizer.encode(t["cwe_entry"].format(i=100 + i, word=w))) for i, w in
                         enumerate(WORDS[:50])])
    n_entries = int(room / per_entry)
    while True:
        freq_common = max(2 * freq_uncommon, n_entries // (2 * n_common))
        n_uncommon = max(0, (n_entries - n_common * freq_common) // freq_uncommon)
        uncommon = distinct_words(rng, n_uncommon, exclude=common)
        words = common * freq_common + uncommon * freq_uncommon
        words = [words[i] for i in rng.permutation(len(words))]
        body = [tokenizer.encode(t["cwe_entry"].format(i=i + 1, word=w)) for i, w in enumerate(words)]
        if sum(len(b) for b in body) <= room or n_entries <= n_common * 2 * freq_uncommon:
            break
        n_entries = int(n_entries * 0.95)
    ids = np.concatenate([intro] + body + [question]).astype(np.int64)
    if len(ids) + n_new > context:
        raise ValueError(f"cwe: a context of {context} tokens is too short for {n_common} common words")
    return Sample("cwe", ids, common, n_new, len(question))


def frequent_words(tokenizer, style, context, rng, n_new=None, alpha=2.0, n_top=3, vocab=200):
    """RULER's fwe: coded words (random 4-letter strings) drawn from a Zipf distribution over a
    vocabulary (p(rank r) ~ 1 / r^alpha); the answer is the n_top most frequent, which must be
    strictly more frequent than every other word (else the draw is repeated)."""
    t = PROSE if style == "prose" else CODE
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    coded = sorted({"".join(rng.choice(letters, 4)) for _ in range(2 * vocab)})[:vocab]
    coded = [coded[i] for i in rng.permutation(len(coded))]
    p = 1.0 / np.arange(1, len(coded) + 1) ** alpha
    p /= p.sum()
    intro = tokenizer.encode(t["fwe_intro"])
    question = tokenizer.encode(t["fwe_q"])
    n_new = answer_tokens(tokenizer, coded[:n_top], n_new)
    room = context - n_new - len(intro) - len(question)
    enc = {w: tokenizer.encode(t["fwe_entry"].format(word=w)) for w in coded}
    for _ in range(100):
        body, n = [], 0
        while True:
            w = coded[int(rng.choice(len(coded), p=p))]
            if n + len(enc[w]) > room:
                break
            body.append(w)
            n += len(enc[w])
        counts = {w: 0 for w in coded}
        for w in body:
            counts[w] += 1
        ranked = sorted(coded, key=lambda w: -counts[w])
        if counts[ranked[n_top - 1]] > counts[ranked[n_top]]:
            break
    else:
        raise ValueError(f"fwe: no draw of {context} tokens with a strict top {n_top}")
    ids = np.concatenate([intro] + [enc[w] for w in body] + [question]).astype(np.int64)
    return Sample("fwe", ids, ranked[:n_top], n_new, len(question))


def make_sample(tokenizer, task, style, context, depth, seed, stream=None, n_new=None):
    """One sample of a task, deterministic given (task, style, context, depth, seed). n_new: decode
    at least this many tokens (the prompt is then context - n_new tokens long: NIAH and vt exactly)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}: choose from {', '.join(TASKS)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: choose prose or code")
    rng = np.random.default_rng([seed, TASKS.index(task), context, round(1000 * depth)])
    if task.startswith("niah"):
        return niah(tokenizer, task, style, context, depth, rng, stream, n_new)
    if task == "vt":
        return variable_tracking(tokenizer, style, context, depth, rng, stream, n_new)
    if task == "cwe":
        return common_words(tokenizer, style, context, rng, n_new)
    return frequent_words(tokenizer, style, context, rng, n_new)


def suite(tokenizer, tasks, style, contexts, n_samples, stream=None, seed=1234):
    """n_samples per (task, context), depths spread evenly over 0..1: -> {(task, context): [Sample]}.
    The samples of a cell all decode the same number of tokens (the most any of them needs), so that
    their prompts have one length (NIAH, vt; cwe and fwe as far as their lists allow) and answer()
    can run them as one batch: the samples are drawn once to find that number, then again with it."""
    out = {}
    for task in tasks:
        for c in contexts:
            depths = [i / max(1, n_samples - 1) for i in range(n_samples)]
            draw = lambda n_new=None: [make_sample(tokenizer, task, style, c, d, seed + i, stream, n_new)
                                       for i, d in enumerate(depths)]
            first = draw()
            n_new = max(s.n_new for s in first)
            out[task, c] = first if all(s.n_new == n_new for s in first) else draw(n_new)
    return out


# ----------------------------------------------------------------------------------------------
# Scoring

def found(text, answer):
    """answer occurs in text as a whole word (not inside a longer word or number), case-insensitive."""
    return re.search(r"(?<![\w-])" + re.escape(answer.lower()) + r"(?![\w-])", text.lower()) is not None


def score(text, answers):
    """1 if every expected answer occurs in the decoded text, else 0 (string_match_all, all-or-nothing)."""
    return int(all(found(text, a) for a in answers))


# ----------------------------------------------------------------------------------------------
# Running the methods: every method at two KV budgets, greedy answers, a table

METHODS = ("quest", "retro", "token_sparse", "compact")
BUDGET_FRACTIONS = ((8, "1/8"), (4, "1/4"))  # budgets as fractions of the context: C/8 and C/4 tokens
PAGE = 16  # generate.py's --page-size default: quest / retro budgets are whole pages


def budget_runs(context, windows, methods=METHODS):
    """(method label, budget label, method, generate.py flags) of every run at one context: dense
    (the ceiling), then per budget C/8 and C/4: Quest (RetroAttention with w = 1), RetroAttention
    (each w), Token Sparse Attention at a fixed keep fraction (a prefill method: decoding stays dense)
    and KV compaction at ratio 8 / 4 (the question stays whole)."""
    runs = [("dense", "full", "dense", [])]
    for d, frac in BUDGET_FRACTIONS:
        b = str(max(PAGE, context // d // PAGE * PAGE))  # whole pages of generate.py's default size
        runs.append(("quest", frac, "retro", ["--budget", b, "--window", "1"]))
        runs += [(f"retro w={w}", frac, "retro", ["--budget", b, "--window", str(w)]) for w in windows]
        runs.append(("token_sparse", frac, "token_sparse", ["--keep", str(1 / d), "--min-tokens", "16",
                                                            "--ts-window", "64"]))
        runs.append(("compact", frac, "compact", ["--ratio", str(d)]))
    return [r for r in runs if r[0] == "dense" or r[0].split()[0] in methods]


@torch.no_grad()
def answer(model, tokenizer, samples, start, cuda_graph=False, batch=1):
    """Greedy-decode each sample's answer through a fresh method state from start(prompts, n_new,
    keep_last) -> (attn, start_pos, window): -> [(score 0/1, decoded text)] in the samples' order;
    a sample the method refuses (compaction's repeat-prefill beyond the model's context) -> (None,
    reason). Samples of one prompt length and one question length (compaction keeps the question
    whole) run together, up to `batch` rows at a time: each row attends only to its own cache, so it
    decodes what it would alone; its answer is cut at its own n_new."""
    device = next(model.parameters()).device
    out = [None] * len(samples)
    for part in batches([(len(s.ids), s.question_len) for s in samples], batch):
        x = torch.from_numpy(np.stack([samples[i].ids for i in part])).to(device)
        n_new = max(samples[i].n_new for i in part)
        try:
            attn, s0, win = start(x, n_new, samples[part[0]].question_len)
        except ValueError as e:
            for i in part:
                out[i] = (None, str(e))
            continue
        new, _ = generate(model, attn, x[:, s0:], n_new, window=win, start_pos=s0, n_vocab=tokenizer.n_words,
                          cuda_graph=cuda_graph)
        for row, i in zip(new.tolist(), part):
            text = tokenizer.decode(row[:samples[i].n_new])
            out[i] = (score(text, samples[i].answers), text)
    return out


def batches(keys, batch):
    """Indices of items that may run as one batch: those of one key (prompt length, question length)
    together, `batch` at a time -> lists of indices, the keys in order of first appearance."""
    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [idx[lo:lo + batch] for idx in groups.values() for lo in range(0, len(idx), batch)]


def cell(task, context, run, samples, scored):
    """One (task, context, run) result: the count, its Wilson interval and two decoded examples.
    run: a budget_runs tuple; scored: answer()'s list."""
    label, budget, method, flags = run
    hits = [s for s, _ in scored if s is not None]
    k, n = sum(hits), len(hits)
    return {"task": task, "context": context, "run": label, "budget": budget, "method": method, "flags": flags,
            "correct": k, "n": n, "skipped": len(scored) - n, "accuracy": k / n if n else None,
            "wilson95": list(wilson(k, n)) if n else None,
            "examples": [{"answers": s.answers, "decoded": text, "score": sc}
                         for s, (sc, text) in list(zip(samples, scored))[:2]]}


def table(cells, contexts, tasks):
    """Markdown: one table per context, a row per run, a column per task: correct/n [95% Wilson]."""
    def fmt(k, n):
        if not n:
            return "n/a"
        lo, hi = wilson(k, n)
        return f"{k}/{n} [{lo:.2f}, {hi:.2f}]"
    lines = []
    for c in [c for c in contexts if any(x["context"] == c for x in cells)]:
        lines += [f"\nContext {c} tokens: exact match, correct/n [95% Wilson interval]\n",
                  "| method | budget | " + " | ".join(tasks) + " | all tasks |",
                  "| --- | --- |" + " ---: |" * (len(tasks) + 1)]
        for run, budget in dict.fromkeys((x["run"], x["budget"]) for x in cells if x["context"] == c):
            row = {x["task"]: x for x in cells if x["context"] == c and x["run"] == run and x["budget"] == budget}
            ks = [row[t]["correct"] if t in row else 0 for t in tasks]
            ns = [row[t]["n"] if t in row else 0 for t in tasks]
            lines.append(f"| {run} | {budget} | " + " | ".join(fmt(k, n) for k, n in zip(ks, ns))
                         + f" | {fmt(sum(ks), sum(ns)) if all(ns) else 'partial'} |")
    return "\n".join(lines)


def plot(result, out_png, plt):
    """Accuracy against budget, one panel per task (pooled over the contexts), Wilson error bars,
    dense as the dashed ceiling. plt: matplotlib.pyplot."""
    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3 * len(tasks), 3), squeeze=False)
    fracs = [f for _, f in sorted(BUDGET_FRACTIONS, reverse=True)]  # 1/8, 1/4
    for ax, task in zip(axes[0], tasks):
        cells = [x for x in result["cells"] if x["task"] == task]

        def pooled(run, budget):
            xs = [x for x in cells if x["run"] == run and x["budget"] == budget]
            k, n = sum(x["correct"] for x in xs), sum(x["n"] for x in xs)
            return (k / n, *wilson(k, n)) if n else None
        d = pooled("dense", "full")
        if d:
            ax.axhline(d[0], color="k", ls="--", lw=1, label="dense")
        for j, run in enumerate(dict.fromkeys(x["run"] for x in cells if x["run"] != "dense")):
            pts = [(i + 0.04 * j, pooled(run, f)) for i, f in enumerate(fracs) if pooled(run, f)]
            if pts:
                ax.errorbar([i for i, _ in pts], [p[0] for _, p in pts], capsize=3, marker="o", label=run,
                            yerr=[[p[0] - p[1] for _, p in pts], [p[2] - p[0] for _, p in pts]])
        ax.set_xticks(range(len(fracs)), [f"{f} of C" for f in fracs])
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(task, fontsize=9)
    axes[0][0].set_ylabel("exact match (95% Wilson)")
    axes[0][-1].legend(fontsize=7)
    measured = sorted({x["context"] for x in result["cells"]})
    fig.suptitle(f"{result['model'].split('/')[-1]}, RULER-style ({result['style']}), contexts {measured}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Intervals

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k, n, z=Z95):
    """The Wilson score interval of a binomial proportion k/n (Wilson 1927): the p for which
    |k/n - p| <= z sqrt(p (1 - p) / n), i.e. center (k/n + z^2/2n) / (1 + z^2/n) +- half-width
    z sqrt(k/n (1 - k/n) / n + z^2/4n^2) / (1 + z^2/n). Unlike k/n +- z sqrt(...), it stays in
    [0, 1] and is not empty at 0/n or n/n. -> (lo, hi)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # at k = 0 (k = n) the bound is 0 (1) exactly; rounding would leave ~1e-17 of it
    return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


def bootstrap(values, n_boot=2000, seed=0, level=0.95):
    """Percentile bootstrap interval of the mean of `values` (one number per prompt): resample the
    prompts with replacement n_boot times, take the mean of each, -> (mean, lo, hi)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap: need a non-empty 1-D list of values, got shape {x.shape}")
    idx = np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))
    means = x[idx].mean(axis=1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_difference(a, b, n_boot=2000, seed=0, level=0.95):
    """mean(a - b) with a bootstrap interval that resamples the prompts, the same indices for both:
    a and b measured on the same prompts are correlated, and pairing removes the prompt-to-prompt
    variation that both share. -> (mean difference, lo, hi)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: a and b must be measured on the same prompts, got {a.shape}, {b.shape}")
    return bootstrap(a - b, n_boot, seed, level)
