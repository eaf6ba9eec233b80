"""The CMUdict phoneme data of Goyal's thesis (CMU 2021), section 6.2.3 "Real Data", on a tiny fake dictionary:
stress removed, length limit, duplicates kept, a seeded split by head word, clear errors on bad input."""
import json
import os

import pytest

from fairseq_ext.data import cmudict_phonemes as cp

FAKE = """\
'bout B AW1 T
a AH0
a(2) EY1
knight N AY1 T
night N AY1 T
night(2) N AY0 T
aalborg AO1 L B AO0 R G # place, danish
abbreviation AH0 B R IY2 V IY0 EY1 SH AH0 N
cat K AE1 T
dog D AO1 G
"""


@pytest.fixture
def fake_dict(tmp_path):
    path = tmp_path / "cmudict.dict"
    path.write_text(FAKE)
    return str(path)


def test_parse_line_strips_stress_variant_and_comment():
    assert cp.parse_line("aalborg(2) AO1 L B AO0 R G # place, danish\n") == ("aalborg", ["AO", "L", "B", "AO", "R", "G"])
    assert cp.parse_line("   \n") is None


def test_splits_keep_duplicates_drop_long_and_group_variants(fake_dict):
    splits = cp.make_splits(fake_dict, max_length=6, seed=3, test_fraction=0.3, valid_fraction=0.0)
    every = sorted(" ".join(s) for seqs in splits.values() for s in seqs)
    # abbreviation (9 phonemes) dropped; knight / night / night(2) all "N AY T": duplicates kept
    assert every == sorted(["B AW T", "AH", "EY", "N AY T", "N AY T", "N AY T", "AO L B AO R G", "K AE T", "D AO G"])
    assert splits["valid"] == []
    for seqs in splits.values():  # the two pronunciations of "a" and of "night" never straddle the split
        flat = [" ".join(s) for s in seqs]
        assert ("AH" in flat) == ("EY" in flat)
    assert len(splits["test"]) >= 1


def test_split_is_seeded_and_covers_every_word():
    words = [f"w{i}" for i in range(50)]
    a = cp.split_words(words, seed=1, test_fraction=0.1, valid_fraction=0.1)
    assert a == cp.split_words(words, seed=1, test_fraction=0.1, valid_fraction=0.1)
    assert a != cp.split_words(words, seed=2, test_fraction=0.1, valid_fraction=0.1)
    assert sorted(a["train"] + a["valid"] + a["test"]) == sorted(words)
    assert (len(a["test"]), len(a["valid"])) == (5, 4)


def test_cli_writes_files(fake_dict, tmp_path):
    out = str(tmp_path / "out")
    cp.main(["--dict", fake_dict, "--out", out, "--max-length", "3", "--seed", "1", "--valid-fraction", "0"])
    lines = [l for split in ("train", "valid", "test") for l in open(os.path.join(out, f"{split}.txt"))]
    assert all(1 <= len(l.split()) <= 3 for l in lines)
    assert all(not any(c.isdigit() for c in l) for l in lines)
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["total"] == len(lines) == 8 and stats["distinct"] == 6


def test_errors_on_missing_empty_and_too_short(tmp_path):
    with pytest.raises(FileNotFoundError, match="CMUdict file not found"):
        cp.read_dict(str(tmp_path / "nope.dict"))
    empty = tmp_path / "empty.dict"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no pronunciations"):
        cp.read_dict(str(empty))
    long_only = tmp_path / "long.dict"
    long_only.write_text("abbreviation AH0 B R IY2 V IY0 EY1 SH AH0 N\n")
    with pytest.raises(ValueError, match="at most 6 phonemes"):
        cp.make_splits(str(long_only), max_length=6, seed=1)
    bad = tmp_path / "bad.dict"
    bad.write_text("word\n")
    with pytest.raises(ValueError, match="without phonemes"):
        cp.read_dict(str(bad))
