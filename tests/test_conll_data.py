"""CoNLL column files -> aligned token/tag files, tag scheme conversion, and alignment checks."""
import os
import subprocess
import sys

import pytest

from fairseq_ext.data.conll import (
    AlignmentError,
    ConllFormatError,
    check_aligned,
    convert,
    main,
    read_conll,
    to_bio,
    to_iob1,
)
from fairseq_ext.scoring.span_f1 import evaluate
from fairseq_ext.testing import cli, synthetic_tagging

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER


-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O"""  # two blank lines in a row, no final newline
# A copy of the original English CoNLL-2003 files (train.txt, valid.txt, test.txt), if the user has one:
# the data is licensed, so the test below runs only when CONLL2003_DIR points at it.
CONLL2003 = os.environ.get("CONLL2003_DIR", "")


def write(tmp_path, text, name="in.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def lines(path):
    with open(path) as f:
        return f.read().splitlines()


def test_conversion_skips_docstart_and_aligns_tokens_with_the_chosen_column(tmp_path):
    src = write(tmp_path, CONLL)
    assert convert(src, str(tmp_path / "out" / "train"), tag_column=3) == (3, 8)
    words = ["EU rejects German call", "Peter Blackburn", "BRUSSELS 1996-08-22"]
    assert lines(tmp_path / "out" / "train.words") == words
    assert lines(tmp_path / "out" / "train.tags") == ["B-ORG O B-MISC O", "B-PER I-PER", "B-LOC O"]
    convert(src, str(tmp_path / "pos"), tag_column=1, source_suffix="src", target_suffix="pos")
    assert lines(tmp_path / "pos.pos") == ["NNP VBZ JJ NN", "NNP NNP", "NNP CD"]
    assert read_conll(src, 3)[1].lines == [8, 9]


def test_scheme_conversion_both_ways():
    bio = "B-PER I-PER B-PER O B-LOC B-PER I-PER O I-ORG".split()  # the last I- after O: ill-formed BIO
    iob1 = "I-PER I-PER B-PER O I-LOC I-PER I-PER O I-ORG".split()
    assert to_iob1(bio) == iob1
    assert to_bio(iob1) == "B-PER I-PER B-PER O B-LOC B-PER I-PER O B-ORG".split()
    assert to_bio(to_iob1(to_bio(iob1))) == to_bio(iob1)


def test_scheme_conversion_keeps_the_chunks(tmp_path):
    sentences = synthetic_tagging.make_sentences(200, seed=3)
    path = synthetic_tagging.write_conll(str(tmp_path / "iob1.txt"), sentences, scheme="iob1")
    convert(path, str(tmp_path / "bio"), tag_column=3, to_scheme="bio")
    assert [line.split() for line in lines(tmp_path / "bio.tags")] == [tags for _, tags in sentences]
    iob1 = [s.tags for s in read_conll(path, 3)]
    assert iob1 != [tags for _, tags in sentences]  # (no B- here: same-type entities never touch)
    c = evaluate([tags for _, tags in sentences], iob1)  # same chunks, read by conlleval's rules
    assert c.correct_chunks == c.gold_chunks == c.guessed_chunks > 100


def test_errors_name_the_file_and_line(tmp_path):
    bad = write(tmp_path, "EU NNP B-NP B-ORG\nrejects VBZ\n", "bad.txt")
    with pytest.raises(ConllFormatError, match=r"bad\.txt:2: expected at least 4 .*found 2"):
        convert(bad, str(tmp_path / "x"), tag_column=3)
    with pytest.raises(ConllFormatError, match=r"in\.txt:3: tag 'NNP' is not O, B-TYPE or I-TYPE"):
        convert(write(tmp_path, CONLL), str(tmp_path / "y"), tag_column=1, to_scheme="bio")
    with pytest.raises(ConllFormatError, match=r"empty\.txt is empty"):
        convert(write(tmp_path, "", "empty.txt"), str(tmp_path / "z"), tag_column=3)
    with pytest.raises(ConllFormatError, match=r"docs\.txt contains no sentences"):
        convert(write(tmp_path, "-DOCSTART- -X- -X- O\n\n\n", "docs.txt"), str(tmp_path / "z"), tag_column=3)


def test_check_aligned(tmp_path):
    words = write(tmp_path, "a b c\nd e\nf g h\n", "x.words")
    assert check_aligned(words, write(tmp_path, "O O O\nO O\nO B-X I-X\n", "ok.tags")) == 3
    with pytest.raises(AlignmentError, match=r"line 3: .*x\.words has 3 tokens but .*bad\.tags has 2"):
        check_aligned(words, write(tmp_path, "O O O\nO O\nO O\n", "bad.tags"))
    with pytest.raises(AlignmentError, match=r"x\.words has 3 lines but .*short\.tags has 2"):
        check_aligned(words, write(tmp_path, "O O O\nO O\n", "short.tags"))
    with pytest.raises(AlignmentError, match=r"none\.tags is empty"):
        check_aligned(words, write(tmp_path, "", "none.tags"))
    with pytest.raises(AlignmentError, match=r"line 2 of .*blank\.tags is empty"):
        check_aligned(words, write(tmp_path, "O O O\n\nO O O\n", "blank.tags"))


def test_command_line(tmp_path):
    src = write(tmp_path, CONLL)
    done = subprocess.run([sys.executable, "-m", "fairseq_ext.data.conll", src, str(tmp_path / "cli" / "test"),
                           "--tag-column", "3", "--to-scheme", "iob1"],
                          capture_output=True, text=True, timeout=cli.HANG_TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3 sentences, 8 tokens" in done.stderr
    assert lines(tmp_path / "cli" / "test.tags") == ["I-ORG O I-MISC O", "I-PER I-PER", "I-LOC O"]
    assert main([write(tmp_path, "a B-X\nb\n", "short.txt"), str(tmp_path / "never"), "--tag-column", "1"]) == 1
    assert not (tmp_path / "never.words").exists()


@pytest.mark.skipif(not CONLL2003 or not os.path.exists(os.path.join(CONLL2003, "valid.txt")),
                    reason="set CONLL2003_DIR to a copy of the English CoNLL-2003 files")  # fmt: skip
def test_conll2003_dev_set_statistics(tmp_path):
    """The English development set has 3250 sentences, 51362 tokens and 5942 entities (Tjong Kim Sang and
    De Meulder, Introduction to the CoNLL-2003 Shared Task, Tables 1 and 2), here in IOB2 tags."""
    prefix = str(tmp_path / "valid")
    assert convert(os.path.join(CONLL2003, "valid.txt"), prefix, tag_column=3) == (3250, 51362)
    tags = [line.split() for line in lines(prefix + ".tags")]
    c = evaluate(tags, tags)
    assert c.gold_chunks == c.correct_chunks == 5942 and c.correct_tags == c.tokens == 51362
    convert(os.path.join(CONLL2003, "valid.txt"), str(tmp_path / "iob1"), tag_column=3, to_scheme="iob1")
    iob1 = [line.split() for line in lines(str(tmp_path / "iob1.tags"))]
    assert iob1 != tags and [to_bio(t) for t in iob1] == tags
