"""Parameter count and inversion FLOPs of FlowSeq's prior flow, ours against the reference implementation's.

Ma et al., "FlowSeq", EMNLP 2019, section 4.1 (FlowSeq-base: latent 256, hidden 512; FlowSeq-large: 512 /
1024), in the layout of the authors' code (XuezheMax/flowseq, ``NMTFlow`` with ``levels 3``, ``num_steps
[4, 4, 2]``, ``coupling_type self_attn``, ``pos_enc attn``, 8 heads, as its WMT configs).

For each size this builds our prior through the named architecture (``--arch flowseq_base`` /
``flowseq_large``, so the package's own defaults are what is measured), counts its parameters, checks them
against ``prior_parameter_count`` (the layout's formula), and counts the floating-point operations of
inverting it (noise -> latent, what argmax decoding runs) for one sentence of ``--length`` target
positions and ``--src-length`` source positions with ``torch.utils.flop_counter`` (a multiply-add = 2).

The reference's count comes from the same formula plus its weight-norm gain vectors (checked against its
own ``NMTFlow``: 51,710,336 and 205,931,264).  With ``--reference-dir DIR`` (a checkout of
XuezheMax/flowseq) the reference's flow is also instantiated and measured the same way; its package
needs ``overrides`` and ``apex`` at import, so the script stubs ``overrides`` and imports only
``flownmt.flows`` (nothing of it is copied here).

    python3 bench/flowseq_param_count.py                       # ~1 min on a CPU
    python3 bench/flowseq_param_count.py --reference-dir ../flowseq

Writes ``OUT/flowseq_param_count.md`` (``--out-dir``, default ``bench/results``).
"""
import argparse
import math
import os
import shlex
import sys
import types
from argparse import Namespace

import torch
from torch.utils.flop_counter import FlopCounterMode

try:  # run as a script from the repository root without installing the package
    import fairseq_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fairseq_ext  # noqa: F401

from fairseq_ext.models import flowseq as flowseq_model
from fairseq_ext.modules.flow_prior import prior_parameter_count

SIZES = {"base": flowseq_model.flowseq_base, "large": flowseq_model.flowseq_large}
# the measurement of this package's previous prior (one coupling per step, 48/48/16 steps, coupling
# networks at the hidden width), for the README's before / after
PREVIOUS = {"base": "300.7M, 10.1 GFLOP", "large": "about 1.2B"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=24, help="target positions of the inverted sentence")
    p.add_argument("--src-length", type=int, default=24, help="source positions")
    p.add_argument("--reference-dir", default=None, help="a checkout of XuezheMax/flowseq to measure too")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def arch_config(size):
    args = Namespace()
    SIZES[size](args)
    cfg = flowseq_model.FlowSeqConfig()
    for name, value in vars(args).items():
        setattr(cfg, name, value)
    return cfg


def inversion_flops(run) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def ours(size, length, src_length):
    cfg = arch_config(size)
    steps = flowseq_model.parse_prior_steps(cfg.flowseq_prior_steps)
    prior = flowseq_model._build_prior(cfg, steps).eval()
    shape = (cfg.flowseq_latent_dim, cfg.encoder_embed_dim, cfg.flowseq_prior_hidden, cfg.flowseq_prior_heads, steps)
    count = sum(p.numel() for p in prior.parameters())
    formula = prior_parameter_count(*shape)
    assert count == formula, (count, formula)
    eps, mask = torch.zeros(1, length, shape[0]), torch.ones(1, length)
    src, src_mask = torch.randn(1, src_length, shape[1]), torch.ones(1, src_length)
    flops = inversion_flops(lambda: prior.inverse(eps, mask, src, src_mask))
    return shape, count, flops


def load_reference(root):
    """The reference's NMTFlow class, imported from a checkout without its package __init__ (apex)."""
    if "overrides" not in sys.modules:
        try:
            import overrides  # noqa: F401
        except ImportError:
            stub = types.ModuleType("overrides")
            stub.overrides = lambda f: f
            sys.modules["overrides"] = stub
    if "torch._six" not in sys.modules:  # removed from newer PyTorch; the reference's utils import inf from it
        six = types.ModuleType("torch._six")
        six.inf = math.inf
        sys.modules["torch._six"] = six
    package = types.ModuleType("flownmt")
    package.__path__ = [os.path.join(os.path.abspath(root), "flownmt")]
    sys.modules["flownmt"] = package
    from flownmt.flows.nmt import NMTFlow

    return NMTFlow


def reference_measured(nmt_flow, shape, length, src_length):
    features, src_features, hidden, heads, steps = shape
    flow = nmt_flow(len(steps), list(steps), features, src_features, [2] * (len(steps) - 1), hidden_features=hidden,
                    inverse=True, transform="affine", coupling_type="self_attn", heads=heads, pos_enc="attn",
                    max_length=250, dropout=0.0).eval()  # fmt: skip
    count = sum(p.numel() for p in flow.parameters())
    eps, mask = torch.zeros(1, length, features), torch.ones(1, length)
    src, src_mask = torch.randn(1, src_length, src_features), torch.ones(1, src_length)
    flops = inversion_flops(lambda: flow.backward(eps, mask, src, src_mask))  # its noise -> latent direction
    return count, flops


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    nmt_flow = load_reference(args.reference_dir) if args.reference_dir else None
    rows = []
    for size in SIZES:
        shape, count, flops = ours(size, args.length, args.src_length)
        ref_formula = prior_parameter_count(*shape, weight_norm_gains=True)
        ref_count, ref_flops = (
            reference_measured(nmt_flow, shape, args.length, args.src_length) if nmt_flow else (None, None)
        )
        rows.append((size, shape, count, flops, ref_formula, ref_count, ref_flops))
        print(f"{size}: ours {count:,} parameters, {flops / 1e9:.3f} GFLOP to invert; reference {ref_formula:,} by "
              f"formula" + (f", {ref_count:,} measured, {ref_flops / 1e9:.3f} GFLOP" if ref_count else ""),
              flush=True)  # fmt: skip
    command = "python3 bench/flowseq_param_count.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["# FlowSeq prior: parameters and inversion FLOPs, ours against the reference implementation", "",
             f"`{command}`", "",
             f"Inversion (noise -> latent, argmax decoding's prior pass) of one sentence of {args.length} target and "
             f"{args.src_length} source positions, counted by `torch.utils.flop_counter` (multiply-add = 2 FLOPs). "
             "Reference: XuezheMax/flowseq `NMTFlow`, levels 3, steps [4, 4, 2], self-attention couplings with "
             "positional attention, 8 heads (its WMT configs); its count by the layout formula plus its weight-norm "
             "gains" + (", and measured by instantiating it from the checkout given" if nmt_flow else
                        " (run with --reference-dir to instantiate it too)") + ".", "",
             "| size (latent / hidden) | ours: parameters | ours: GFLOP | reference: parameters (formula) "
             "| reference: parameters (measured) | reference: GFLOP (measured) | previous layout (issue) |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for size, shape, count, flops, ref_formula, ref_count, ref_flops in rows:
        prev_cell = PREVIOUS[size]
        lines.append(f"| {size} ({shape[0]} / {shape[2]}) | {count:,} | {flops / 1e9:.3f} | {ref_formula:,} | "
                     f"{f'{ref_count:,}' if ref_count else '-'} | {f'{ref_flops / 1e9:.3f}' if ref_flops else '-'} | "
                     f"{prev_cell} |")  # fmt: skip
    lines += ["", "Ours lacks only the reference's weight-norm gain vector on each coupling's output layer (a plain "
              "zero-initialised linear instead): 2 x (width of z_b) parameters per coupling."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, "flowseq_param_count.md")
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
