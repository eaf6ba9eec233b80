"""The text-completion metrics of Welleck and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in
Neural Sequence Modeling" (AAAI 2021), section 5.1 / Table 1, on fairseq-generate's output of
``--task text_completion``: Edit (token edit distance / reference length, EOS on both sides: the ``edit`` task
loss), Nonterm (share of continuations without EOS), Repetition (1 - unique 4-grams / 4-grams, over
continuations with a 4-gram), Avg. len. (tokens before EOS) and, with a frozen language model, LM (sum of
-log p of the continuation, EOS included when emitted).

Command line (the recipes' scoring stage)::

    python -m fairseq_ext.modules.completion_metrics --generate-output test.greedy.out \
        --test-text text/test.txt --dict bin/dict.txt --prefix-length 10 [--scorer mle/checkpoint_last.pt]
"""
import argparse
import json
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

from fairseq_ext.modules.task_losses import ngram_repetition, normalized_edit_distance

_LINE = re.compile(r"^([HP])-(\d+)\t(.*)$")


def parse_generate(path: str) -> Dict[int, Tuple[List[str], bool]]:
    """example id -> (hypothesis tokens, terminated) from fairseq-generate's H- and P- lines.

    A P- line has one score per hypothesis token plus one for EOS when the hypothesis emitted it, so a
    continuation terminated iff it has one more positional score than printed tokens.
    """
    hyps, scores = {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "H":
                hyps[i] = (rest.split("\t", 1)[1] if "\t" in rest else "").split()
            else:
                scores[i] = len(rest.split())
    missing = sorted(set(hyps) ^ set(scores))
    if missing:
        raise ValueError(f"{path}: H- and P- lines disagree for example ids {missing[:10]}")
    return {i: (toks, scores[i] == len(toks) + 1) for i, toks in hyps.items()}


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def completion_metrics(
    hypotheses: Sequence[Sequence[int]],
    terminated: Sequence[bool],
    references: Sequence[Sequence[int]],
    eos: int,
    lm_nll: Optional[Sequence[float]] = None,
) -> Dict[str, Optional[float]]:
    """Corpus means of Table 1's columns over B continuations (token ids, EOS excluded) and their references."""
    if not (len(hypotheses) == len(terminated) == len(references)):
        raise ValueError("hypotheses, terminated and references differ in length")
    edit = [
        normalized_edit_distance(list(h) + ([eos] if done else []), list(r) + [eos])
        for h, done, r in zip(hypotheses, terminated, references)
    ]
    return {
        "edit": _mean(edit),
        "nonterm": _mean([0.0 if done else 1.0 for done in terminated]),
        "repetition": _mean([ngram_repetition(list(h)) for h in hypotheses]),
        "length": _mean([float(len(h)) for h in hypotheses]),
        "lm": _mean(lm_nll) if lm_nll is not None else None,
    }


def score_file(generate_output, test_text, dictionary, prefix_length, scorer=None) -> Dict[str, Optional[float]]:
    """The metrics of one fairseq-generate output; example i is line i of ``test_text`` (prefix = its first
    ``prefix_length`` tokens).  Every line must have exactly one hypothesis."""
    with open(test_text, encoding="utf-8") as f:
        lines = [line.split() for line in f]
    outputs = parse_generate(generate_output)
    if sorted(outputs) != list(range(len(lines))):
        absent = sorted(set(range(len(lines))) - set(outputs))[:10]
        raise ValueError(f"{generate_output}: {len(outputs)} hypotheses for {len(lines)} test prefixes "
                         f"(first missing ids: {absent})")  # fmt: skip
    ids = range(len(lines))
    prefixes = [[dictionary.index(w) for w in lines[i][:prefix_length]] for i in ids]
    refs = [[dictionary.index(w) for w in lines[i][prefix_length:]] for i in ids]
    hyps = [[dictionary.index(w) for w in outputs[i][0]] for i in ids]
    done = [outputs[i][1] for i in ids]
    nll = scorer.nll(hyps, done, prefixes) if scorer is not None else None
    return completion_metrics(hyps, done, refs, dictionary.eos(), nll)


def format_line(name: str, m: Dict[str, Optional[float]]) -> str:
    def fmt(v, digits):
        return "-" if v is None else f"{v:.{digits}f}"

    return (f"COMPLETION {name}: edit {fmt(m['edit'], 4)} nonterm {fmt(m['nonterm'], 4)} "
            f"repetition {fmt(m['repetition'], 4)} length {fmt(m['length'], 2)} lm {fmt(m['lm'], 2)}")  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description="Table 1 metrics of Welleck and Cho (2021) on fairseq-generate output")
    p.add_argument("--generate-output", required=True, help="fairseq-generate --task text_completion output")
    p.add_argument("--test-text", required=True, help="the test examples, one per line (line i = example i)")
    p.add_argument("--dict", required=True, help="the binarised data's dict.txt")
    p.add_argument("--prefix-length", type=int, required=True, help="--completion-prefix-length")
    p.add_argument("--scorer", default=None, help="frozen language model checkpoint for the LM column")
    p.add_argument("--name", default="model")
    p.add_argument("--json", default=None, help="also write the metrics here")
    args = p.parse_args(argv)
    from fairseq.data import Dictionary

    d = Dictionary.load(args.dict)
    scorer = None
    if args.scorer:
        from fairseq_ext.modules.task_losses import LanguageModelScorer

        scorer = LanguageModelScorer.from_checkpoint(args.scorer, d, flag="--scorer")
    try:
        m = score_file(args.generate_output, args.test_text, d, args.prefix_length, scorer)
    except ValueError as e:
        raise SystemExit(f"ERROR: {e}")
    print(format_line(args.name, m))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m, f)


if __name__ == "__main__":
    main()
