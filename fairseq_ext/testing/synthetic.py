"""Synthetic parallel and monolingual data with known answers (copy, reverse, sort).

Every example is a sequence of symbols ``w0 .. w{V-1}``; the target is the source copied, reversed
or sorted (by symbol index).  Lengths are drawn uniformly from ``[min_len, max_len]``.  Files are
plain text, one sentence per line, tokens separated by spaces, ready for fairseq-preprocess.
"""
import os
import random
from typing import Dict, List, Sequence, Tuple

TASKS = ("copy", "reverse", "sort")


def symbol(i: int) -> str:
    return f"w{i}"


def make_target(source: Sequence[int], task: str) -> List[int]:
    if task == "copy":
        return list(source)
    if task == "reverse":
        return list(reversed(source))
    if task == "sort":
        return sorted(source)
    raise ValueError(f"unknown synthetic task {task!r}; choose one of {TASKS}")


def make_pairs(n: int, task: str, vocab: int, min_len: int, max_len: int, seed: int) -> List[Tuple[List[int], List[int]]]:
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        src = [rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))]
        pairs.append((src, make_target(src, task)))
    return pairs


def _line(ids: Sequence[int]) -> str:
    return " ".join(symbol(i) for i in ids)


def write_parallel(
    out_dir: str,
    task: str = "reverse",
    vocab: int = 20,
    min_len: int = 3,
    max_len: int = 10,
    sizes: Dict[str, int] = None,
    src: str = "src",
    tgt: str = "tgt",
    seed: int = 1,
) -> str:
    """Writes ``{split}.{src}`` / ``{split}.{tgt}`` for train/valid/test; returns out_dir."""
    sizes = sizes or {"train": 1000, "valid": 100, "test": 100}
    os.makedirs(out_dir, exist_ok=True)
    for k, (split, n) in enumerate(sorted(sizes.items())):
        pairs = make_pairs(n, task, vocab, min_len, max_len, seed=seed * 1000 + k)
        with open(os.path.join(out_dir, f"{split}.{src}"), "w") as fs, open(
            os.path.join(out_dir, f"{split}.{tgt}"), "w"
        ) as ft:
            for s, t in pairs:
                fs.write(_line(s) + "\n")
                ft.write(_line(t) + "\n")
    return out_dir


def write_monolingual(
    out_dir: str, vocab: int = 20, min_len: int = 3, max_len: int = 10, sizes: Dict[str, int] = None, seed: int = 1
) -> str:
    """Writes ``{split}.txt`` of sentences with structure an LM can learn: a run of a symbol, then its reverse."""
    sizes = sizes or {"train": 1000, "valid": 100, "test": 100}
    os.makedirs(out_dir, exist_ok=True)
    for k, (split, n) in enumerate(sorted(sizes.items())):
        with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:
            for s, t in make_pairs(n, "reverse", vocab, min_len, max_len, seed=seed * 1000 + k):
                f.write(_line(s + t) + "\n")
    return out_dir
