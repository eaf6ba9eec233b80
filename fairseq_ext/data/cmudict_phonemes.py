"""English phoneme sequences from the CMU Pronouncing Dictionary: the real data of Table 6.1.

Goyal, "Characterizing and Overcoming the Limitations of Neural Autoregressive Models" (PhD thesis, CMU 2021),
section 6.2.3, "Real Data": "We removed the stress markers so that the vocabulary size is 39, and only
considered sequences of length up to 6 (77653 instances). We made a 90-10 train-test split on this data."

What this module does, and the choices the thesis leaves open:

* every pronunciation line ``word PH1 PH2 ...`` is one instance (a trailing `` # comment`` is dropped); the stress
  digits 0/1/2 are removed from the vowels (``AH0`` -> ``AH``), leaving the 39 ARPAbet phonemes;
* instances longer than ``--max-length`` phonemes are dropped; **duplicates are kept**: homophones
  (``knight`` / ``night``) and stress-only variants become the same sequence, and each stays an instance of its
  own -- the thesis's count (77653) is that of the lines, not of the distinct sequences (with the December 2024
  dictionary: 77985 lines of <= 6 phonemes, 61409 distinct sequences);
* the 90/10 train/test split is by **head word** (a seeded shuffle of the words): the alternative
  pronunciations ``word(2)``, ``word(3)`` go with ``word``, so one word's variants never straddle the split
  (homophones of different words still may, as in any split of this dictionary); ``--valid-fraction`` of the
  training words are held out again as a validation split for early stopping.

Output: DIR/{train,valid,test}.txt, one sequence per line (phonemes separated by spaces), for
``fairseq-preprocess --only-source`` and ``--task language_modeling --sample-break-mode eos``, and DIR/stats.json.

CLI: ``python -m fairseq_ext.data.cmudict_phonemes --dict cmudict.dict --out DIR --max-length 6 --seed 1``.
"""
import argparse
import json
import os
import random
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

STRESS = re.compile(r"[012]$")
VARIANT = re.compile(r"\(\d+\)$")


def parse_line(line: str) -> Optional[Tuple[str, List[str]]]:
    """``'word(2) AH0 B # note'`` -> (``'word'``, [``'AH'``, ``'B'``]); None for a blank line."""
    fields = line.split(" #", 1)[0].split()
    if not fields:
        return None
    if len(fields) < 2:
        raise ValueError(f"a dictionary line without phonemes: {line.strip()!r}")
    return VARIANT.sub("", fields[0]), [STRESS.sub("", p) for p in fields[1:]]


def read_dict(path: str) -> "OrderedDict[str, List[List[str]]]":
    """head word -> its pronunciations (stress removed), in file order; clear errors on a missing/empty file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CMUdict file not found: {path!r} (expected cmudict.dict, one 'word PH1 PH2 ...' "
                                "a line)")  # fmt: skip
    words: "OrderedDict[str, List[List[str]]]" = OrderedDict()
    with open(path, encoding="utf-8") as f:
        for line in f:
            parsed = parse_line(line)
            if parsed is not None:
                words.setdefault(parsed[0], []).append(parsed[1])
    if not words:
        raise ValueError(f"CMUdict file {path!r} holds no pronunciations")
    return words


def split_words(words: Sequence[str], seed: int, test_fraction: float, valid_fraction: float) -> Dict[str, List[str]]:
    """A seeded shuffle of the head words cut into test (``test_fraction`` of all words), valid
    (``valid_fraction`` of the remaining ones) and train."""
    if not (0.0 < test_fraction < 1.0 and 0.0 <= valid_fraction < 1.0):
        raise ValueError(f"need 0 < test fraction < 1 and 0 <= valid fraction < 1, got {test_fraction}, {valid_fraction}")
    order = list(words)
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * test_fraction)
    rest = order[n_test:]
    n_valid = round(len(rest) * valid_fraction)
    return {"train": rest[n_valid:], "valid": rest[:n_valid], "test": order[:n_test]}


def make_splits(path: str, max_length: int, seed: int, test_fraction: float = 0.1,
                valid_fraction: float = 0.05) -> Dict[str, List[List[str]]]:  # fmt: skip
    """{split: phoneme sequences of 1..max_length phonemes}, duplicates kept (see the module doc)."""
    if max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {max_length}")
    entries = read_dict(path)
    kept = OrderedDict((w, [p for p in prons if len(p) <= max_length]) for w, prons in entries.items())
    kept = OrderedDict((w, prons) for w, prons in kept.items() if prons)
    if not kept:
        raise ValueError(f"no pronunciation in {path!r} has at most {max_length} phonemes")
    return {split: [p for w in ws for p in kept[w]]
            for split, ws in split_words(list(kept), seed, test_fraction, valid_fraction).items()}  # fmt: skip


def write_splits(out_dir: str, splits: Dict[str, List[List[str]]]) -> Dict[str, object]:
    os.makedirs(out_dir, exist_ok=True)
    for split, seqs in splits.items():
        with open(os.path.join(out_dir, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.writelines(" ".join(s) + "\n" for s in seqs)
    every = [s for seqs in splits.values() for s in seqs]
    stats = {
        "instances": {split: len(seqs) for split, seqs in splits.items()},
        "total": len(every),
        "distinct": len({tuple(s) for s in every}),
        "phonemes": sorted({p for s in every for p in s}),
    }
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dict", required=True, help="path of cmudict.dict ('word PH1 PH2 ...' per line)")
    parser.add_argument("--out", required=True, help="output directory for {train,valid,test}.txt and stats.json")
    parser.add_argument("--max-length", type=int, default=6, help="longest sequence kept, in phonemes (thesis: 6)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the word-level train/valid/test shuffle")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of head words in test (thesis: 0.1)")
    parser.add_argument("--valid-fraction", type=float, default=0.05,
                        help="share of the remaining head words held out for validation (early stopping); 0 = none")  # fmt: skip
    args = parser.parse_args(argv)
    splits = make_splits(args.dict, args.max_length, args.seed, args.test_fraction, args.valid_fraction)
    stats = write_splits(args.out, splits)
    print(json.dumps({k: v for k, v in stats.items() if k != "phonemes"} | {"phonemes": len(stats["phonemes"])}))


if __name__ == "__main__":
    main()
