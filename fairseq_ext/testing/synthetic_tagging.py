"""Synthetic NER-like data with a deterministic entity rule, and tiny taggers for tests.

Words come from three closed classes: ``Per{i}`` (person names), ``Loc{i}`` (place names) and
``w{i}`` (everything else).  A maximal run of same-class name words is one entity (PER or LOC);
other words are O.  So a tag depends on the word and on its left neighbour (B- vs I-), which a
bidirectional or left-to-right encoder, or the label history, can learn in a few hundred updates.
Entities of the same class are always separated by at least one O word, so the rule never hides
a chunk boundary.  Files are CoNLL-2003-like (``TOKEN POS CHUNK NER``, -DOCSTART- lines, BIO or
IOB1 tags), for the converter in fairseq_ext/data/conll.py.
"""
import os
import random
import tempfile
from typing import Dict, List, Sequence, Tuple

import torch
from fairseq import options, tasks
from fairseq.data import Dictionary, LanguagePairDataset

from fairseq_ext.data.conll import to_iob1
from fairseq_ext.testing.cli import USER_DIR, run_cli

ENTITY_CLASSES = {"PER": "Per", "LOC": "Loc"}
NER_TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
# the POS column: NNP for names, one of these for ``w{i}`` (by i), so a POS tagger has more labels than a
# soft beam of 3 needs first tokens
OTHER_POS = ("NN", "VB", "DT", "JJ")


def make_sentence(rng: random.Random, min_len: int, max_len: int, names: int = 8,
                  others: int = 20) -> Tuple[List[str], List[str]]:  # fmt: skip
    """One sentence (words, BIO tags) of length in [min_len, max_len]."""
    length = rng.randint(min_len, max_len)
    words, tags = [], []
    previous_class = None
    while len(words) < length:
        room = length - len(words)
        kind = rng.choice(["O", "O", "PER", "LOC"])
        if kind == "O" or kind == previous_class:
            words.append(f"w{rng.randrange(others)}")
            tags.append("O")
            previous_class = None
            continue
        span = min(rng.randint(1, 3), room)
        for k in range(span):
            words.append(f"{ENTITY_CLASSES[kind]}{rng.randrange(names)}")
            tags.append(("B-" if k == 0 else "I-") + kind)
        previous_class = kind
    return words, tags


def make_sentences(n: int, min_len: int = 2, max_len: int = 10, seed: int = 1) -> List[Tuple[List[str], List[str]]]:
    rng = random.Random(seed)
    return [make_sentence(rng, min_len, max_len) for _ in range(n)]


def write_conll(path: str, sentences: Sequence[Tuple[Sequence[str], Sequence[str]]], scheme: str = "bio",
                sentences_per_document: int = 7) -> str:  # fmt: skip
    """Writes CoNLL-2003-style columns (TOKEN POS CHUNK NER); returns path."""
    with open(path, "w") as f:
        for i, (words, tags) in enumerate(sentences):
            if i % sentences_per_document == 0:
                f.write("-DOCSTART- -X- -X- O\n\n")
            tags = to_iob1(tags) if scheme == "iob1" else list(tags)
            for word, tag in zip(words, tags):
                pos = "NNP" if tag != "O" else OTHER_POS[int(word[1:]) % len(OTHER_POS)]
                f.write(f"{word} {pos} {'I-NP' if tag != 'O' else 'O'} {tag}\n")
            f.write("\n")
    return path


def write_conll_splits(out_dir: str, sizes: Dict[str, int], scheme: str = "bio", seed: int = 1) -> Dict[str, str]:
    """Writes ``{split}.txt`` CoNLL files; returns split -> path."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for k, (split, n) in enumerate(sorted(sizes.items())):
        sentences = make_sentences(n, seed=seed * 1000 + k)
        paths[split] = write_conll(os.path.join(out_dir, f"{split}.txt"), sentences, scheme)
    return paths


def preprocess_tagging(raw_prefix_dir: str, dest_dir: str, src: str = "words", tgt: str = "tags") -> str:
    """fairseq-preprocess of aligned ``{train,valid,test}.{src,tgt}`` with separate dictionaries
    (cli.preprocess joins them, which would put words into the label vocabulary)."""
    pref = lambda split: os.path.join(raw_prefix_dir, split)  # noqa: E731
    args = ["--source-lang", src, "--target-lang", tgt, "--trainpref", pref("train"), "--validpref", pref("valid")]
    if os.path.exists(os.path.join(raw_prefix_dir, f"test.{src}")):
        args += ["--testpref", pref("test")]
    return run_cli("fairseq-preprocess", args + ["--destdir", dest_dir, "--workers", "1"])


# -- tiny models ------------------------------------------------------------------------------------
TINY_TAGGER_FLAGS = [
    "--encoder-embed-dim", "8", "--encoder-hidden-size", "8", "--decoder-embed-dim", "4",
    "--decoder-hidden-size", "12", "--dropout", "0",
]  # fmt: skip
TINY_WORDS = [f"w{i}" for i in range(8)]


def write_dictionaries(data_dir: str, words: Sequence[str] = TINY_WORDS, tags: Sequence[str] = NER_TAGS,
                       src: str = "words", tgt: str = "tags"):  # fmt: skip
    os.makedirs(data_dir, exist_ok=True)
    for name, symbols in ((src, words), (tgt, tags)):
        with open(os.path.join(data_dir, f"dict.{name}.txt"), "w") as f:
            f.writelines(f"{s} {1000 - i}\n" for i, s in enumerate(symbols))


def build_tagger(arch: str = "seq2seq_tagger_ner", flags: Sequence[str] = (),
                 criterion: Sequence[str] = ("--criterion", "cross_entropy"), data_dir: str = None,
                 tags: Sequence[str] = NER_TAGS, seed: int = 1):  # fmt: skip
    """(task, model, criterion): a tiny seq2seq tagger on ``--task tagging`` over TINY_WORDS and ``tags``.

    Later flags win, so ``flags`` may override TINY_TAGGER_FLAGS (e.g. ``--dropout 0.3``).
    """
    data_dir = data_dir or tempfile.mkdtemp(prefix="fairseq_ext_tagger_")
    write_dictionaries(data_dir, tags=tags)
    argv = [data_dir, "--user-dir", USER_DIR, "--cpu", "--task", "tagging", "-s", "words", "-t", "tags",
            "--arch", arch, *TINY_TAGGER_FLAGS, *criterion, *flags]  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    torch.manual_seed(seed)
    model = task.build_model(args)
    return task, model, task.build_criterion(args)


def tagging_batch(task, sentences: Sequence[Tuple[Sequence[str], Sequence[str]]], left_pad_source: bool = True,
                  given_order: bool = False):  # fmt: skip
    """A fairseq mini-batch for (words, tags) pairs, collated as --task tagging collates them.

    fairseq sorts examples by decreasing source length; ``given_order`` keeps the order given.
    """
    src = [_encode(task.src_dict, words) for words, _ in sentences]
    tgt = [_encode(task.tgt_dict, tags) for _, tags in sentences]
    dataset = LanguagePairDataset(src, [len(x) for x in src], task.src_dict, tgt, [len(x) for x in tgt],
                                  task.tgt_dict, left_pad_source=left_pad_source)  # fmt: skip
    sample = dataset.collater([dataset[i] for i in range(len(sentences))])
    if given_order:
        from fairseq_ext.testing.tiny import restore_order

        sample = restore_order(sample)
    return sample


def _encode(dictionary: Dictionary, symbols: Sequence[str]) -> torch.Tensor:
    ids = [dictionary.index(s) for s in symbols]
    if dictionary.unk() in ids:
        raise ValueError(f"symbol not in the dictionary: {[s for s, i in zip(symbols, ids) if i == dictionary.unk()]}")
    return torch.tensor(ids + [dictionary.eos()], dtype=torch.long)
