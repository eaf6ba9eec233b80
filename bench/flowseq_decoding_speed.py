"""Decoding time per sentence: FlowSeq (argmax; NPD n = l x r = 3 x 5) against an autoregressive
Transformer with beam search (Ma et al. 2019, section 4.3 and Figure 4).

Both models are built at the paper's base sizes with random weights (speed does not depend on training):

* FlowSeq-base: ``--arch flowseq_wmt_en_de`` (256 / 512 wide; encoder 6, posterior and decoder 4 layers,
  8 heads; the prior in the reference implementation's layout, steps 4, 4, 2: 51.7M parameters; or
  ``--prior-steps``), decoded by ``FlowSeqGenerator``;
* Transformer-base: ``--arch transformer_wmt_en_de`` (512 wide, FFN 2048, 6 + 6 layers, 8 heads), decoded by
  fairseq's ``SequenceGenerator`` with ``--beam 5``; it is also NPD's rescoring teacher (as in the paper).

One joined dictionary of ``--vocab`` symbols (the paper's WMT14 BPE has 37k), shared embeddings.
Random weights would make both models choose their own lengths, so lengths are fixed: a source of L
random words; the Transformer is held to exactly L words + EOS (``min_len = max_len = L``); FlowSeq's
length predictor is replaced by one whose top class is L + 1 rounded up to the length unit (the next
ones +-4, NPD's other length candidates); its decoding is otherwise the generator's own.

Two sweeps, as the paper's Figure 4: (a) batch size in ``--batch-sizes`` at target length ``--length``;
(b) target length in ``--lengths`` at batch size ``--length-batch-size``.  Every decoder is warmed up
once, every configuration ``--warmup`` times more, then timed ``--repeats`` times (the decoders
interleaved, the order rotated per repeat, so machine load hits them alike); the tables report medians
of wall and process-CPU seconds per sentence (batch time / batch size) and the per-sentence time ratio
beam 5 / FlowSeq (the speed-up; > 1: FlowSeq is faster) measured in the same run, and end with the ratio
rows in ``bench/independent_runs.py``'s format: ``--runs N`` repeats the whole measurement as N
separate processes and reports every ratio's median and range over them.  CPU time is the steadier
figure on a shared machine (it does not count time spent waiting for a core).  On a CPU, FLOPs
dominate: NPD's teacher scores 15 full candidates (3x the tokens of a beam of 5), so it is slower than
beam search there; the paper's speed-ups are for a GPU, where the Transformer's sequential steps are
the cost.

    OMP_NUM_THREADS=1 python3 bench/flowseq_decoding_speed.py                    # CPU, a few minutes
    OMP_NUM_THREADS=1 python3 bench/flowseq_decoding_speed.py --runs 3           # median and range over 3 runs
    python3 bench/flowseq_decoding_speed.py --quick                             # smoke run, ~1 min
    python3 bench/flowseq_decoding_speed.py --device cuda --batch-sizes 1,4,8,32,64,128 \\
        --lengths 10,20,30,40,50,60,70 --length-batch-size 32 --repeats 10

Writes ``OUT/NAME.md`` (the tables and the exact command; ``--out-dir``, default ``bench/results``,
``--out-name``, default ``flowseq_decoding_speed``) and, when matplotlib is installed (``pip install
.[plot]``), ``OUT/NAME.png``: the paper's Figure 4, milliseconds per sentence and the speed-up over beam 5
against batch size and against target length.
"""
import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from argparse import Namespace

import torch

try:  # run as a script from the repository root without installing the package
    import fairseq_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fairseq_ext  # noqa: F401

from fairseq import options, tasks
from fairseq.sequence_generator import SequenceGenerator

from fairseq_ext.generators.flowseq_generator import FlowSeqGenerationConfig, FlowSeqGenerator
from fairseq_ext.testing import tiny
from fairseq_ext.testing.cli import USER_DIR

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import independent_runs  # noqa: E402

DECODERS = ("transformer_beam5", "flowseq_argmax", "flowseq_npd15")
COLORS = {"transformer_beam5": "C0", "flowseq_argmax": "C1", "flowseq_npd15": "C2"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--vocab", type=int, default=37000, help="joined dictionary size (paper WMT14: 37k BPE)")
    p.add_argument("--batch-sizes", default="1,8,32,128", help="sweep (a): sentences per batch")
    p.add_argument("--length", type=int, default=20, help="sweep (a): target length in words")
    p.add_argument("--lengths", default="10,20,30,40", help="sweep (b): target lengths in words")
    p.add_argument("--length-batch-size", type=int, default=None, help="sweep (b): batch size (cpu 1, cuda 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per configuration first (cpu 0, cuda 1; "
                   "one global warm-up always runs)")
    p.add_argument("--npd-max-batch", type=int, default=None,
                   help="time NPD only at batch sizes up to this (cpu 8: NPD decodes 15 candidates per sentence, "
                   "minutes per batch of 128 on a CPU; cuda: no limit); 0 = no limit")  # fmt: skip
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--npd-lengths", type=int, default=3, help="NPD's l (length candidates)")
    p.add_argument("--npd-samples", type=int, default=5, help="NPD's r (samples per length)")
    p.add_argument("--fp16", action="store_true", help="half precision (cuda only)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: vocab 8000, batch sizes 1,8, lengths 10,20, 1 repeat")  # fmt: skip
    p.add_argument("--prior-steps", default=None,
                   help="FlowSeq's --flowseq-prior-steps (default: the architecture's, the reference's 4,4,2)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--out-name", default="flowseq_decoding_speed", help="file name of the results, no suffix")
    p.add_argument("--no-write", action="store_true", help="print only (what --runs children do)")
    independent_runs.add_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.batch_sizes, args.lengths, args.repeats = 8000, "1,8", "10,20", 1
        args.length, args.length_batch_size = 10, 2
    cpu = args.device == "cpu"
    if args.length_batch_size is None:
        args.length_batch_size = 1 if cpu else 8
    if args.warmup is None:
        args.warmup = 0 if cpu else 1
    if args.npd_max_batch is None:
        args.npd_max_batch = 8 if cpu else 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.fp16 and args.device != "cuda":
        p.error("--fp16 needs --device cuda")
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.lengths = [int(x) for x in args.lengths.split(",")]
    return args


def build(data_dir, task_flags):
    argv = [data_dir, "--user-dir", USER_DIR, "-s", "src", "-t", "tgt", "--share-all-embeddings", *task_flags,
            "--dropout", "0", "--max-source-positions", "1024", "--max-target-positions", "1024"]  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    return task, task.build_model(args)


class FixedLengthFlowSeq(object):
    """A FlowSeq model whose length predictor prefers a given length (ranked L*, L*+4, L*-4, L*+8 ...).

    Every other attribute is the wrapped model's, so the generator runs its own decoding unchanged.
    """

    def __init__(self, model, words: int):
        self._model = model
        unit = model.length_unit
        best = -(-(words + 1) // unit) * unit  # words + EOS, rounded up to the length unit
        ranked = [best]
        for k in range(1, 4):
            ranked += [best + k * unit, best - k * unit]
        self._lengths = torch.tensor([x for x in ranked if x > 0])

    def __getattr__(self, name):
        return getattr(self._model, name)

    def length_log_probs(self, src, src_mask):
        c = self._lengths.numel()
        logits = -torch.arange(c, dtype=torch.float, device=src.device)  # best first
        lp = logits.log_softmax(0).unsqueeze(0).expand(src.size(0), -1)
        return lp, self._lengths.to(src.device).unsqueeze(0).expand(src.size(0), -1)


def make_sample(dictionary, batch_size, words, device, seed):
    g = torch.Generator().manual_seed(seed)
    first = dictionary.nspecial
    src = torch.randint(first, first + 1000 if len(dictionary) > first + 1000 else len(dictionary), (batch_size, words),
                        generator=g)  # fmt: skip
    src = torch.cat([src, torch.full((batch_size, 1), dictionary.eos())], dim=1)
    lengths = torch.full((batch_size,), words + 1, device=device)
    return {"net_input": {"src_tokens": src.to(device), "src_lengths": lengths}}


def timed(fn, device):
    """(wall seconds, process CPU seconds, result)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, out


def run_config(decoders, batch_size, words, args, tgt_dict, seed):
    """Median (wall, CPU) seconds per sentence of each decoder on one batch of ``batch_size`` sources of
    ``words`` (None for a decoder not timed at this batch size)."""
    sample = make_sample(tgt_dict, batch_size, words, args.device, seed)
    fns = {name: make(words) for name, make in decoders.items()}
    if args.npd_max_batch and batch_size > args.npd_max_batch:
        fns.pop("flowseq_npd15")

    def run(name):
        wall, cpu, out = timed(lambda: fns[name](sample), args.device)
        assert len(out) == batch_size and all(len(h) > 0 for h in out), f"{name}: a sentence got no hypothesis"
        return wall, cpu

    for name in fns:
        for _ in range(args.warmup):
            run(name)
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:  # rotate the order per repeat
            wall, cpu = run(name)
            times[name].append((wall / batch_size, cpu / batch_size))
    return {
        name: (statistics.median(t[0] for t in times[name]), statistics.median(t[1] for t in times[name]))
        if times.get(name) else None
        for name in decoders
    }  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if independent_runs.repeat(args, "bench/flowseq_decoding_speed.py"):
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data_dir = tempfile.mkdtemp(prefix="flowseq_speed_")
    tiny.write_dictionary(data_dir, args.vocab)
    prior_flags = ["--flowseq-prior-steps", args.prior_steps] if args.prior_steps else []
    flow_task, flowseq = build(data_dir, ["--task", "translation_flowseq", "--arch", "flowseq_wmt_en_de",
                                          "--criterion", "flowseq_loss", *prior_flags])  # fmt: skip
    _, transformer = build(data_dir, ["--task", "translation", "--arch", "transformer_wmt_en_de"])
    tgt_dict = flow_task.target_dictionary
    dtype = torch.float16 if args.fp16 else torch.float32
    for m in (flowseq, transformer):
        m.to(device=args.device, dtype=dtype).eval()
    millions = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (flowseq, transformer, flowseq.prior)]
    args.sizes = (f"FlowSeq-base {millions[0]:.1f}M parameters (its prior {millions[2]:.1f}M, steps "
                  f"{flowseq.cfg.flowseq_prior_steps}), Transformer-base {millions[1]:.1f}M, vocab {len(tgt_dict)}")
    print(args.sizes, flush=True)

    argmax_cfg = FlowSeqGenerationConfig()
    npd_cfg = FlowSeqGenerationConfig(flowseq_decoding="npd", flowseq_length_candidates=args.npd_lengths,
                                      flowseq_samples=args.npd_samples, flowseq_temperature=0.5)  # fmt: skip

    def flowseq_decoder(cfg, teacher=None):
        def make(words):
            model = FixedLengthFlowSeq(flowseq, words)
            gen = FlowSeqGenerator([flowseq], tgt_dict, cfg, teacher=teacher)
            return lambda sample: gen.generate([model], sample)

        return make

    def transformer_decoder(words):
        gen = SequenceGenerator([transformer], tgt_dict, beam_size=args.beam, max_len_a=0, max_len_b=words,
                                min_len=words)  # fmt: skip
        return lambda sample: gen.generate([transformer], sample)

    decoders = {
        "transformer_beam5": transformer_decoder,
        "flowseq_argmax": flowseq_decoder(argmax_cfg),
        "flowseq_npd15": flowseq_decoder(npd_cfg, teacher=transformer),
    }
    with torch.no_grad():  # one global warm-up of every decoder (allocator, kernels, lazy init)
        run_config(decoders, 1, 5, Namespace(**{**vars(args), "repeats": 0, "warmup": 1}), tgt_dict, seed=999)
    started, load_before = time.time(), os.getloadavg()[0]
    by_batch, by_length = [], []
    with torch.no_grad():
        for i, b in enumerate(args.batch_sizes):
            by_batch.append((b, args.length, run_config(decoders, b, args.length, args, tgt_dict, seed=i)))
            print_row("batch", *by_batch[-1])
        for i, words in enumerate(args.lengths):
            med = run_config(decoders, args.length_batch_size, words, args, tgt_dict, seed=100 + i)
            by_length.append((args.length_batch_size, words, med))
            print_row("length", *by_length[-1])
    elapsed = time.time() - started
    text = report(args, by_batch, by_length, elapsed, argv, (load_before, os.getloadavg()[0]))
    print(text, flush=True)
    if args.no_write:
        return
    os.makedirs(args.out_dir, exist_ok=True)
    md = os.path.join(args.out_dir, args.out_name + ".md")
    with open(md, "w") as f:
        f.write(text)
    print(f"wrote {md} ({elapsed:.0f} s of timing)")
    plot(args, by_batch, by_length)


def print_row(kind, batch_size, words, med):
    ar = med["transformer_beam5"][1]
    med = {n: t for n, t in med.items() if t is not None}
    cells = ", ".join(f"{n} {1000 * t[1]:.2f} ms CPU ({ar / t[1]:.2f}x)" for n, t in med.items())
    print(f"[{kind}] batch {batch_size} length {words}: {cells}", flush=True)


def table(rows, key_name, key_index):
    """Milliseconds per sentence (wall / CPU) and the speed-ups (beam 5 time / FlowSeq time, CPU)."""
    lines = [f"| {key_name} | Transformer beam 5 (ms/sent, wall / CPU) | FlowSeq argmax (ms/sent) "
             "| FlowSeq NPD n=15 (ms/sent) | argmax speed-up (wall / CPU) | NPD speed-up (wall / CPU) |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def ms(t):
        return f"{1000 * t[0]:.1f} / {1000 * t[1]:.1f}" if t else "not timed (--npd-max-batch)"

    def ratio(ar, t):
        return f"{ar[0] / t[0]:.2f}x / {ar[1] / t[1]:.2f}x" if t else "-"

    for row in rows:
        ar, am, npd = (row[2][n] for n in DECODERS)
        lines.append(f"| {row[key_index]} | {ms(ar)} | {ms(am)} | {ms(npd)} | {ratio(ar, am)} | {ratio(ar, npd)} |")
    return "\n".join(lines)


def ratio_rows(by_batch, by_length):
    """The speed-ups in bench/independent_runs.py's format (``| name a / b | wall | CPU | target |``)."""
    lines = []
    for group, rows, key, label in (("by batch size", by_batch, 0, "batch"), ("by target length", by_length, 1,
                                                                               "length")):  # fmt: skip
        lines += [f"### {group}", "", "| ratio | wall | CPU | target |", "|---|---:|---:|---|"]
        for row in rows:
            ar = row[2]["transformer_beam5"]
            for name in DECODERS[1:]:
                t = row[2][name]
                if t is None:
                    continue
                target = ">= 2 (issue, CPU)" if name == "flowseq_argmax" and label == "batch" and row[0] >= 32 else ""
                lines.append(f"| {label} {row[key]}: beam5 / {name} | {ar[0] / t[0]:.3f} | {ar[1] / t[1]:.3f} "
                             f"| {target} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def report(args, by_batch, by_length, elapsed, argv, load):
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    device += f" (1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, {os.cpu_count()} cores)"
    command = " ".join(["python3 bench/flowseq_decoding_speed.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " + command
    return "\n".join([
        "# FlowSeq decoding speed (paper section 4.3, Figure 4)", "",
        f"`{command}`", "",
        f"Device: {device}; {'fp16' if args.fp16 else 'fp32'}; {args.sizes}; random weights; "
        f"medians of {args.repeats} timed runs after a warm-up of every decoder (+{args.warmup} per configuration); "
        f"{elapsed:.0f} s of timing. "
        "Speed-up = Transformer time / FlowSeq time per sentence (> 1: FlowSeq is faster). NPD: l = "
        f"{args.npd_lengths} lengths x r = {args.npd_samples} samples, rescored by the Transformer "
        "(teacher-forced), included in its time.", "",
        f"## (a) by batch size (target length {args.length} words)", "", table(by_batch, "batch size", 0), "",
        f"## (b) by target length (batch size {args.length_batch_size})", "", table(by_length, "target words", 1), "",
        "## Speed-ups (beam 5 time / FlowSeq time per sentence)", "", ratio_rows(by_batch, by_length),
    ])  # fmt: skip


def plot(args, by_batch, by_length):
    """The paper's Figure 4: ms per sentence (CPU time on a CPU) and the speed-up over beam 5, against batch
    size and against target length.  matplotlib is optional (``pip install .[plot]``), imported here only."""
    try:
        import logging

        import matplotlib

        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging config would print its debug
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install .[plot]); the markdown table has the numbers")
        return
    which = 1 if args.device == "cpu" else 0  # CPU time on a CPU, wall time on a GPU
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for col, (rows, idx, label) in enumerate(((by_batch, 0, "batch size"), (by_length, 1, "target length (words)"))):
        xs = [r[idx] for r in rows]
        for name in DECODERS:
            pts = [(x, r[2][name][which]) for x, r in zip(xs, rows) if r[2][name] is not None]
            axes[0][col].plot([p[0] for p in pts], [1000 * p[1] for p in pts], marker="o", label=name,
                              color=COLORS[name])  # fmt: skip
            if name != "transformer_beam5":
                ratios = [(x, r[2]["transformer_beam5"][which] / r[2][name][which])
                          for x, r in zip(xs, rows) if r[2][name] is not None]  # fmt: skip
                axes[1][col].plot([p[0] for p in ratios], [p[1] for p in ratios], marker="o", label=name,
                                  color=COLORS[name])  # fmt: skip
        axes[0][col].set_ylabel("ms per sentence")
        axes[0][col].set_yscale("log")
        axes[1][col].axhline(1.0, color="grey", linewidth=0.8)
        axes[1][col].set_ylabel("speed-up over beam 5")
        axes[1][col].set_xlabel(label)
        if idx == 0:
            axes[1][col].set_xscale("log", base=2)
        for ax in axes[:, col]:
            ax.legend(fontsize=8)
    fig.suptitle(f"FlowSeq-base vs Transformer-base beam 5 ({'CPU time, 1 thread' if which else args.device})")
    fig.tight_layout()
    path = os.path.join(args.out_dir, args.out_name + ".png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
