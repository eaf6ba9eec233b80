#!/usr/bin/env python3
"""Training step time of the soft beam search loss (Goyal's thesis, chapter 4) against
cross-entropy on the seq2seq tagger, and against sequential scheduled sampling on a transformer.

Three model groups, every variant of a group timed on the SAME weights, optimizer state and batches:

* ``tagger_ner``: ``--arch seq2seq_tagger_ner`` (64-unit LSTMs, 8-dim label embeddings, 9 labels),
  ``ce`` (label_smoothed_cross_entropy, --label-smoothing 0) vs ``soft_beam_k3`` (soft_beam_loss,
  k = 3, direct loss, local normalization, gold length); the thesis: "roughly k times slower than
  standard CE training" (section 4.3.3), so the target is time(soft_beam_k3) / time(ce) <= 3;
* ``tagger_supertag``: the same on ``seq2seq_tagger_supertag`` (512/512, 1,284 labels: CCGbank's);
* ``transformer``: 3+3 layers, 256 wide (bench/throughput.py's model and synthetic reverse corpus),
  ``ce`` vs ``sequential_ss`` (--ss-prob 1: every input is the model's own argmax, one incremental
  decoder step per position) vs ``soft_beam_k3`` (free length: gold length + 5 steps, finished
  hypotheses absorbing; the incremental key/value caches mixed by the soft backpointers).

The measurement machinery is bench/throughput.py's (imported, not copied): the model is built once
per group, weights and Adam state are restored from a snapshot before every timed step (outside the
timer) and the RNG re-seeded per batch; a step is ``task.train_step`` + ``optimizer.step()``; rounds
are interleaved across ALL variants of all groups, the order rotated each round; warm-up rounds
are discarded; the tables report medians over rounds of both wall time and the process's CPU time
(the stable figure on a shared machine), and ratios of the medians.

Usage:

    OMP_NUM_THREADS=1 python3 bench/soft_beam_step_time.py            # default: a few minutes on CPU
    python3 bench/soft_beam_step_time.py --device cuda --rounds 10
    python3 bench/soft_beam_step_time.py --groups tagger_ner --rounds 3 --no-write
    OMP_NUM_THREADS=1 python3 bench/soft_beam_step_time.py --runs 5   # each ratio: median and range over 5 runs

Writes bench/results/soft_beam_step_time.md (table + exact command; rewritten) and appends the raw
per-round numbers to bench/results/soft_beam_step_time.log (JSON lines); ``--no-write`` skips both.
"""
import argparse
import datetime
import os
import random
import statistics
import sys
import time

import independent_runs

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GROUPS = ("tagger_ner", "tagger_supertag", "transformer")


def parse_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS)")
    p.add_argument("--groups", default=",".join(GROUPS), help="comma-separated subset of " + ", ".join(GROUPS))
    p.add_argument("--k", type=int, default=3, help="soft beam size")
    p.add_argument("--hinge", action="store_true", help="also time --soft-beam-objective hinge")
    p.add_argument("--global-norm", action="store_true", help="also time --soft-beam-normalization global")
    p.add_argument("--no-sequential", action="store_true", help="skip sequential_ss on the transformer")
    g = p.add_argument_group("tagger data (synthetic, binarised once under --data-dir)")
    g.add_argument("--tag-min-len", type=int, default=10)
    g.add_argument("--tag-max-len", type=int, default=30, help="CoNLL-2003 averages 14.5 words, CCGbank 23.5")
    g.add_argument("--tag-words", type=int, default=5000)
    g.add_argument("--tag-sentences", type=int, default=2000)
    g.add_argument("--tag-max-tokens", type=int, default=2000, help="--max-tokens of a tagger batch")
    g.add_argument("--ner-labels", type=int, default=9)
    g.add_argument("--supertag-labels", type=int, default=1284)
    g = p.add_argument_group("transformer (bench/throughput.py's model and corpus)")
    g.add_argument("--vocab", type=int, default=8000)
    g.add_argument("--min-len", type=int, default=30)
    g.add_argument("--max-len", type=int, default=40)
    g.add_argument("--train-sentences", type=int, default=4000)
    g.add_argument("--max-tokens", type=int, default=1500, help="--max-tokens of a transformer batch")
    g.add_argument("--extra-steps", type=int, default=5, help="--soft-beam-extra-steps (free length)")
    g = p.add_argument_group("measurement")
    g.add_argument("--num-batches", type=int, default=1, help="distinct batches per variant and round")
    g.add_argument("--rounds", type=int, default=5, help="timed rounds")
    g.add_argument("--warmup-rounds", type=int, default=1)
    g.add_argument("--seed", type=int, default=1)
    independent_runs.add_arguments(g)
    g.add_argument("--data-dir", default=os.path.join(REPO, "bench", "runs", "soft_beam_step_time_data"))
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    g.add_argument("--out-name", default="soft_beam_step_time")
    g.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


CLI = parse_cli()
# bench/throughput.py parses its own command line when imported: give it the machine flags only
_argv, sys.argv = sys.argv, [os.path.join(HERE, "throughput.py"), "--device", CLI.device, "--threads", str(CLI.threads)]
sys.path.insert(0, HERE)
import throughput  # noqa: E402  (sets OMP_NUM_THREADS, silences warnings, imports torch and fairseq)

sys.argv = _argv

import torch  # noqa: E402
from fairseq import optim, options, tasks, utils  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

from fairseq_ext.testing.synthetic_tagging import preprocess_tagging  # noqa: E402

USER_DIR = throughput.USER_DIR


# -- data -------------------------------------------------------------------------------------------
def tagging_data(cli, labels: int) -> str:
    """Synthetic aligned word / label files, binarised with separate dictionaries; returns data-bin."""
    tag = f"tag_w{cli.tag_words}_l{labels}_len{cli.tag_min_len}-{cli.tag_max_len}_n{cli.tag_sentences}_s{cli.seed}"
    root = os.path.join(cli.data_dir, tag)
    data_bin = os.path.join(root, "bin")
    if os.path.exists(os.path.join(data_bin, "train.words-tags.tags.idx")):
        return data_bin
    rng = random.Random(cli.seed)
    raw = os.path.join(root, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n in (("train", cli.tag_sentences), ("valid", 20)):
        with open(os.path.join(raw, f"{split}.words"), "w") as fw, open(os.path.join(raw, f"{split}.tags"), "w") as ft:
            for _ in range(n):
                length = rng.randint(cli.tag_min_len, cli.tag_max_len)
                words = [rng.randrange(cli.tag_words) for _ in range(length)]
                # the label depends on the word and on its left neighbour (a learnable, label-rich rule)
                tags = [(w * 7 + (words[i - 1] if i else 0)) % labels for i, w in enumerate(words)]
                fw.write(" ".join(f"w{w}" for w in words) + "\n")
                ft.write(" ".join(f"T{t}" for t in tags) + "\n")
    preprocess_tagging(raw, data_bin)
    return data_bin


# -- groups -----------------------------------------------------------------------------------------
def soft_beam_flags(cli, name_suffix=""):
    base = ["--criterion", "soft_beam_loss", "--soft-beam-size", str(cli.k), "--soft-beam-alpha", "1"]
    out = {f"soft_beam_k{cli.k}": base + ["--soft-beam-objective", "direct", "--soft-beam-normalization", "local"]}
    if cli.hinge:
        out[f"soft_beam_k{cli.k}_hinge"] = base + ["--soft-beam-objective", "hinge", "--soft-beam-normalization", "local"]
    if cli.global_norm:
        out[f"soft_beam_k{cli.k}_global"] = base + ["--soft-beam-objective", "direct", "--soft-beam-normalization", "global"]
    return out


def group_spec(cli, group):
    """(base argv without the criterion, {variant: criterion flags}, description)."""
    device = ["--cpu"] if cli.device == "cpu" else []
    common = ["--optimizer", "adam", "--lr", "1e-3", "--seed", str(cli.seed), "--num-workers", "0",
              "--user-dir", USER_DIR, "--required-batch-size-multiple", "1", *device]  # fmt: skip
    if group in ("tagger_ner", "tagger_supertag"):
        labels = cli.ner_labels if group == "tagger_ner" else cli.supertag_labels
        arch = "seq2seq_tagger_ner" if group == "tagger_ner" else "seq2seq_tagger_supertag"
        data_bin = tagging_data(cli, labels)
        base = [data_bin, "--task", "tagging", "--source-lang", "words", "--target-lang", "tags", "--arch", arch,
                "--dropout", "0.2", "--max-tokens", str(cli.tag_max_tokens), *common]  # fmt: skip
        variants = {"ce": ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.0"]}
        variants.update({n: f + ["--soft-beam-length", "gold"] for n, f in soft_beam_flags(cli).items()})
        desc = (f"{arch}, synthetic tagging data ({labels} labels, {cli.tag_words} words, lengths "
                f"{cli.tag_min_len}-{cli.tag_max_len}), --max-tokens {cli.tag_max_tokens}")
        return base, variants, desc
    data_bin = throughput.prepare_data(argparse.Namespace(
        synthetic_task="reverse", vocab=cli.vocab, min_len=cli.min_len, max_len=cli.max_len,
        train_sentences=cli.train_sentences, seed=cli.seed, data_dir=os.path.join(REPO, "bench", "runs", "throughput_data")))
    base = [data_bin, "--task", "translation", "--source-lang", "src", "--target-lang", "tgt", "--arch", "transformer",
            "--encoder-layers", "3", "--decoder-layers", "3", "--encoder-embed-dim", "256", "--decoder-embed-dim", "256",
            "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
            "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--dropout", "0.1",
            "--max-tokens", str(cli.max_tokens), *common]  # fmt: skip
    variants = {"ce": ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.0"]}
    if not cli.no_sequential:
        variants["sequential_ss"] = ["--criterion", "sequential_ss", "--ss-prob", "1", "--ss-conditioning", "argmax",
                                     "--ss-schedule", "constant"]  # fmt: skip
    variants.update({n: f + ["--soft-beam-length", "free", "--soft-beam-extra-steps", str(cli.extra_steps)]
                     for n, f in soft_beam_flags(cli).items()})
    desc = (f"transformer 3+3 layers, 256 wide, 4 heads, ffn 1024; synthetic reverse task, vocab {cli.vocab}, "
            f"lengths {cli.min_len}-{cli.max_len}, --max-tokens {cli.max_tokens}")
    return base, variants, desc


def parse(argv):
    return options.parse_args_and_arch(options.get_training_parser(), argv)


class Group(throughput.Bench):
    """One model with its criteria, optimizer and batches; the timing methods are throughput.Bench's."""

    def __init__(self, cli, name):  # noqa: super().__init__ builds a transformer from throughput's flags
        self.cli = cli
        self.name = name
        self.device = torch.device(cli.device)
        base, self.flags, self.description = group_spec(cli, name)
        first = next(iter(self.flags.values()))
        cfg = convert_namespace_to_omegaconf(parse(base + first))
        utils.set_torch_seed(cli.seed)
        self.task = tasks.setup_task(cfg.task)
        self.model = self.task.build_model(cfg.model).to(self.device)
        self.criteria = {}
        for variant, flags in self.flags.items():
            crit = self.task.build_criterion(convert_namespace_to_omegaconf(parse(base + flags)).criterion).to(self.device)
            if hasattr(crit, "set_num_updates"):
                crit.set_num_updates(0)
            self.criteria[variant] = crit
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optim.build_optimizer(cfg.optimizer, params)
        self.batches = self._group_batches(cfg.dataset.max_tokens)
        self.num_params = sum(p.numel() for p in params)
        self.vocab_size = len(self.task.target_dictionary)
        # One untimed step so that Adam's state exists, then the weights go back to their random
        # initialisation: after even one cross-entropy update on the synthetic corpus the model's argmax
        # is EOS (the most frequent target symbol), every soft beam element would finish at step 1 and
        # the free-length search would stop there, timing nothing.  From the random initialisation the
        # hard paths (almost) never emit EOS: the search runs its full horizon (gold length + extra
        # steps), the worst case.
        initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._step(next(iter(self.flags)), self.batches[0], 0)
        self.model.load_state_dict(initial)
        self.model_snapshot = initial
        self.opt_snapshot = self._clone(self.optimizer.state_dict())

    def _group_batches(self, max_tokens):
        """The first --num-batches batches of the shuffled training set (throughput.Bench._batches with
        the group's own --max-tokens)."""
        saved = self.cli.max_tokens
        self.cli.max_tokens = max_tokens
        try:
            return self._batches(None)
        finally:
            self.cli.max_tokens = saved


# -- reporting --------------------------------------------------------------------------------------
def render(groups, results, cli, wall):
    lines = [
        f"## Soft beam search loss: training step time ({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})",
        "",
        "Command (from the repository root):",
        "",
        "```",
        throughput.command_line(),
        "```",
        "",
        f"- machine: {throughput.machine_description(cli)}; fairseq {__import__('fairseq').__version__}; "
        f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "- step = task.train_step (criterion forward + backward) + optimizer.step (adam); weights and optimizer state "
        f"restored before every step; rounds interleaved over all variants of all groups with rotated order; "
        f"{cli.warmup_rounds} warm-up round(s) discarded, {cli.rounds} timed; medians over rounds of a round's summed "
        f"step time over its {cli.num_batches} batches",
        f"- wall time of the benchmark: {wall / 60:.1f} min",
        "",
    ]
    for g in groups:
        toks = [int(b["ntokens"]) for b in g.batches]
        sents = [int(b["nsentences"]) for b in g.batches]
        lines += [f"### {g.name}", "",
                  f"{g.description}; {g.num_params / 1e6:.2f}M parameters, {g.vocab_size} target symbols; batches of "
                  f"{toks} target tokens / {sents} sentences", "",
                  "| variant | criterion flags | median s/round (wall) | min-max (wall) | median s/round (CPU) "
                  "| vs ce (wall) | vs ce (CPU) |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        med = {v: statistics.median(r["seconds"] for r in results[g.name][v]) for v in g.flags}
        cmed = {v: statistics.median(r["cpu_seconds"] for r in results[g.name][v]) for v in g.flags}
        for v, flags in g.flags.items():
            walls = [r["seconds"] for r in results[g.name][v]]
            shown = " ".join(f for f in flags if f != "--criterion")
            lines.append(f"| {v} | `{shown}` | {med[v]:.3f} | {min(walls):.3f}-{max(walls):.3f} | {cmed[v]:.3f} "
                         f"| {med[v] / med['ce']:.2f} | {cmed[v] / cmed['ce']:.2f} |")
        lines += ["", "| ratio of median step time | wall | CPU | target |", "|---|---:|---:|---|"]
        for v in g.flags:
            if v.startswith("soft_beam"):
                lines.append(f"| {v} / ce | {med[v] / med['ce']:.2f} | {cmed[v] / cmed['ce']:.2f} | <= {cli.k} (thesis: ~k) |")
                if "sequential_ss" in g.flags:
                    lines.append(f"| {v} / sequential_ss | {med[v] / med['sequential_ss']:.2f} "
                                 f"| {cmed[v] / cmed['sequential_ss']:.2f} | |")
        if "sequential_ss" in g.flags:
            lines.append(f"| sequential_ss / ce | {med['sequential_ss'] / med['ce']:.2f} "
                         f"| {cmed['sequential_ss'] / cmed['ce']:.2f} | |")
        lines.append("")
    return "\n".join(lines)


def main(cli):
    if independent_runs.repeat(cli, "bench/soft_beam_step_time.py"):
        return
    torch.set_num_threads(cli.threads)
    start = time.perf_counter()
    names = [g.strip() for g in cli.groups.split(",") if g.strip()]
    for n in names:
        if n not in GROUPS:
            sys.exit(f"--groups: unknown group {n!r}; choose from {', '.join(GROUPS)}")
    groups = [Group(cli, n) for n in names]
    jobs = [(g, v) for g in groups for v in g.flags]
    results = {g.name: {v: [] for v in g.flags} for g in groups}
    raw = []
    for r in range(cli.warmup_rounds + cli.rounds):
        warm = r < cli.warmup_rounds
        order = jobs[r % len(jobs):] + jobs[: r % len(jobs)]
        for g, v in order:
            tokens, walls, cpus = g.run_variant(v)
            rec = {"round": r, "warmup": warm, "group": g.name, "variant": v, "tokens": tokens,
                   "seconds": sum(walls), "cpu_seconds": sum(cpus),
                   "steps": [round(x, 4) for x in walls], "cpu_steps": [round(x, 4) for x in cpus]}  # fmt: skip
            raw.append(rec)
            if not warm:
                results[g.name][v].append(rec)
            print(f"round {r}{' (warm-up)' if warm else ''} {g.name:>15} {v:>22}: {rec['seconds']:7.3f} s wall, "
                  f"{rec['cpu_seconds']:7.3f} s CPU, {len(walls)} steps, {tokens} tokens", flush=True)
    table = render(groups, results, cli, time.perf_counter() - start)
    print()
    print(table)
    if not cli.no_write:
        throughput.write_results(cli, "bench/soft_beam_step_time.py", table, raw)

if __name__ == "__main__":
    main(CLI)
