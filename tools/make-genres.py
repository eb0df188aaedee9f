"""Shakespeare's speeches labelled by their play's genre: data/shakespeare/genres.jsonl.

The labels are the First Folio's (1623) division of the plays into
Comedies, Histories and Tragedies; the speeches come from
data/shakespeare/shakespeare.txt (Project Gutenberg texts, public domain;
see data/shakespeare/README.md). Plays outside the Folio (Pericles) and
the poems are left out. Validation holds whole plays (one per genre) that
training never sees, so that the score is of genre, not of play or
speaker. Each speech is its first 40 words; speeches of fewer than 12
words are left out. Per genre, 400 training and 100 validation speeches
are drawn with a fixed seed.

Usage: python3 tools/make-genres.py  (writes data/shakespeare/genres.jsonl)
"""

import json
import pathlib
import random
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = ROOT / "data/shakespeare/shakespeare.txt"
OUT = ROOT / "data/shakespeare/genres.jsonl"

COMEDY, HISTORY, TRAGEDY = 0, 1, 2
# Each play's title line in shakespeare.txt, and its Folio genre.
PLAYS = {
    "ALL'S WELL THAT ENDS WELL": COMEDY,
    "AS YOU LIKE IT": COMEDY,
    "THE COMEDY OF ERRORS": COMEDY,
    "LOVE'S LABOUR'S LOST": COMEDY,
    "MEASURE FOR MEASURE": COMEDY,
    "THE MERCHANT OF VENICE": COMEDY,
    "THE MERRY WIVES OF WINDSOR": COMEDY,
    "A MIDSUMMER NIGHT'S DREAM": COMEDY,
    "MUCH ADO ABOUT NOTHING": COMEDY,
    "THE TAMING OF THE SHREW": COMEDY,
    "THE TEMPEST": COMEDY,
    "TWELFTH NIGHT; OR, WHAT YOU WILL": COMEDY,
    "THE TWO GENTLEMEN OF VERONA": COMEDY,
    "THE WINTER'S TALE": COMEDY,
    "KING JOHN": HISTORY,
    "THE TRAGEDY OF KING RICHARD THE SECOND": HISTORY,
    "KING HENRY IV, THE FIRST PART": HISTORY,
    "KING HENRY IV, SECOND PART": HISTORY,
    "THE LIFE OF KING HENRY V": HISTORY,
    "KING HENRY VI, FIRST PART": HISTORY,
    "HISTORY OF KING HENRY THE SIXTH, SECOND PART": HISTORY,
    "THE HISTORY OF KING HENRY THE SIXTH, THIRD PART": HISTORY,
    "THE LIFE AND DEATH OF KING RICHARD III": HISTORY,
    "THE LIFE OF HENRY THE EIGHTH": HISTORY,
    "THE HISTORY OF TROILUS AND CRESSIDA": TRAGEDY,
    "THE TRAGEDY OF CORIOLANUS": TRAGEDY,
    "THE TRAGEDY OF TITUS ANDRONICUS": TRAGEDY,
    "ROMEO AND JULIET": TRAGEDY,
    "THE LIFE OF TIMON OF ATHENS": TRAGEDY,
    "JULIUS CAESAR": TRAGEDY,
    "MACBETH": TRAGEDY,
    "HAMLET, PRINCE OF DENMARK": TRAGEDY,
    "THE TRAGEDY OF KING LEAR": TRAGEDY,
    "OTHELLO, THE MOOR OF VENICE": TRAGEDY,
    "ANTONY AND CLEOPATRA": TRAGEDY,
    "CYMBELINE": TRAGEDY,
}
HELD_OUT = {"TWELFTH NIGHT; OR, WHAT YOU WILL", "KING HENRY IV, THE FIRST PART", "MACBETH"}
TITLES = sorted(set(PLAYS) | {"A LOVER'S COMPLAINT", "THE PASSIONATE PILGRIM", "PERICLES PRINCE OF TYRE",
                              "THE PHOENIX AND THE TURTLE", "THE RAPE OF LUCRECE", "THE SONNETS"}, key=len, reverse=True)


def plays(text):
    """(title, body) of each work, split where a title line follows the previous work's end."""
    starts = []
    for m in re.finditer(r"^(?:.*?)(" + "|".join(re.escape(t) for t in TITLES) + r")\n\n", text, re.M):
        # A title at the start of a line, or glued to the previous work's last line.
        starts.append((m.start(1), m.group(1)))
    starts.sort()
    for (at, title), nxt in zip(starts, starts[1:] + [(len(text), None)]):
        yield title, text[at:nxt[0]]


def speeches(body):
    """The speeches of a play: blocks that open with a speaker's name in capitals and a full stop."""
    for block in body.split("\n\n"):
        lines = [l.strip() for l in block.strip().split("\n")]
        if len(lines) < 2 or not re.fullmatch(r"[A-Z][A-Z .'-]*\.", lines[0]):
            continue
        words = re.sub(r"\[[^\]]*\]", " ", " ".join(lines[1:])).split()
        if len(words) >= 12:
            yield " ".join(words[:40])


def main():
    text = TEXT.read_text()
    pools = {(g, s): [] for g in (COMEDY, HISTORY, TRAGEDY) for s in ("train", "val")}
    seen = set()
    for title, body in plays(text):
        if title not in PLAYS or title in seen:
            continue
        seen.add(title)
        split = "val" if title in HELD_OUT else "train"
        pools[(PLAYS[title], split)].extend(speeches(body))
    missing = set(PLAYS) - seen
    assert not missing, f"plays not found: {missing}"
    rng = random.Random(1623)
    rows = []
    for split, n in (("train", 400), ("val", 100)):
        for genre in (COMEDY, HISTORY, TRAGEDY):
            pool = pools[(genre, split)]
            assert len(pool) >= n, (genre, split, len(pool))
            rows += [{"text": t, "label": genre, "split": split} for t in rng.sample(pool, n)]
    rng.shuffle(rows)
    with OUT.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} speeches to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
