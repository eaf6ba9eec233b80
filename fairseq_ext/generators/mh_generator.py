"""Decoding a conditional masked LM by Metropolis-Hastings sampling from its energy, or by degenerate Gibbs.

Goyal, "Characterizing and Overcoming the Limitations of Neural Autoregressive Models" (PhD thesis, CMU
2021), chapter 6 (Goyal, Dyer and Berg-Kirkpatrick), Algorithm 4 and sections 6.5-6.8, over fairseq's
``cmlm_transformer`` (Ghazvininejad et al. 2019, "Mask-Predict", as fairseq implements it).  Per batch:

    encode the sources once                                     B x S
    top-l target lengths of the length predictor                B x l      (--mh-length-beam; 6.5)
    chains: sentence x length rank x chain, flattened           C = B*l*K  (--mh-chains)
    warm start: the greedy fill of BOS [MASK]^T EOS (one pass)  C x (T+2)  (Algorithm 4, line 3)
    burn-in epochs, then sample epochs (one sweep each)         (--mh-burn-in-epochs, --mh-sample-epochs)
    hypotheses per sentence (--mh-output):
      final    every chain's last state, lowest energy first (so the best length and chain lead);
      best     every chain's lowest-energy state seen (warm start and burn-in included), lowest first;
      samples  every chain's state after each sample epoch, chain by chain in epoch order (length rank
               0's chains first), so ``--nbest N`` prints the first chain's samples.

The sampler math is in ``fairseq_ext/modules/metropolis_hastings.py`` and the energies (E_local, E_raw,
the batched single-masked passes and their cache) in ``fairseq_ext/modules/mlm_energy.py``.

Hypotheses: ``tokens`` = the T target tokens and EOS (BOS dropped, as fairseq's generators);
``positional_scores`` = the negated per-position energy terms of ``--mh-energy`` (log p_mlm(y_t | y_\\t)
for local, the raw logit for raw; 0 for EOS, which is never sampled); ``score`` = -E(y), their sum
(no length normalisation: the target distribution is exp(-E)).  ``alignment`` and ``attention`` are None.

Randomness: counter-based (see the sampler module): every random number is a function of (``--seed``,
the sentence's dataset id, length rank, chain, epoch, step, slot), so the samples do not depend on the
batch order, the batch size, padding, or ``--mh-max-tokens-per-pass``.

Statistics (``--mh-stats-path``): one JSON line per (decoded batch, epoch), epoch 0 = the warm start,
with the keys epoch, phase (warm_start | burn_in | sample), chains, acceptance_rate, novel_rate (accepted
and different from the current state; both null for the warm start), energy_local, energy_raw (mean
over chains of the state after the epoch), target_temperature and block_size of the epoch.
"""
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq.data import Dictionary
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from torch import Tensor

from fairseq_ext.modules.metropolis_hastings import MetropolisHastingsSampler, SamplerSettings, check_settings
from fairseq_ext.modules.mlm_energy import CMLMMaskedLM, PassCounter, layout_tokens

logger = logging.getLogger(__name__)

SAMPLER_CHOICES = ChoiceEnum(["mh", "gibbs", "mask_predict"])
ENERGY_CHOICES = ChoiceEnum(["local", "raw"])
ORDER_CHOICES = ChoiceEnum(["random", "left_to_right"])
OUTPUT_CHOICES = ChoiceEnum(["final", "best", "samples"])


@dataclass
class MHGenerationConfig(FairseqDataclass):
    """Decoding options of the MH generator; a task config inherits them (fairseq's GenerationConfig is closed)."""

    mh_sampler: SAMPLER_CHOICES = field(
        default="mh",
        metadata={
            "help": "mh = Metropolis-Hastings with the masked conditionals as proposal (thesis ch. 6, Algorithm 4); "
            "gibbs = degenerate Gibbs sampling, every proposal accepted (sec. 6.6; not a valid sampler of any "
            "energy); mask_predict = fairseq's iterative refinement (IterativeRefinementGenerator; its "
            "--iter-decode-* options apply, the --mh-* ones do not)"
        },
    )
    mh_energy: ENERGY_CHOICES = field(
        default="local",
        metadata={
            "help": "target energy: local = E_local = -sum_t log p_mlm(y_t | y_\\t) (sec. 6.2.4, the thesis's "
            "E_norm); raw = E_raw = -sum_t logit_t(y_t) with t masked (sec. 6.2.1); over the target tokens, "
            "BOS/EOS excluded (never masked by cmlm_transformer)"
        },
    )
    mh_proposal_temperature: float = field(
        default=1.0,
        metadata={"help": "proposal temperature T_q > 0: q = softmax(logits / T_q) (sec. 6.4.1; 1 = the masked "
                  "conditional; Table 6.6 uses 0.8)"},
    )
    mh_top_p: float = field(
        default=1.0,
        metadata={"help": "nucleus of the proposal, in (0, 1]: the smallest most-probable set of mass >= p, "
                  "renormalised, for the forward and the reverse move alike (sec. 6.4.1; 1 = no truncation)"},
    )
    mh_block_size: int = field(
        default=1,
        metadata={"help": "positions masked and resampled together per proposal (block MH, sec. 6.4.1, 6.7.3); "
                  "1 = single-site; larger than a target's length is an error"},
    )
    mh_block_anneal: bool = field(
        default=False,
        metadata={"help": "anneal the block size linearly from --mh-block-size at the first epoch to 1 at the "
                  "last (sec. 6.7.3)"},
    )
    mh_order: ORDER_CHOICES = field(
        default="random",
        metadata={"help": "visiting order of an epoch (one sweep over the positions): random = a fresh "
                  "permutation per chain and epoch, without replacement (sec. 6.5, the thesis's choice); "
                  "left_to_right"},
    )
    mh_burn_in_epochs: int = field(
        default=7, metadata={"help": "burn-in epochs after the warm start (sec. 6.5: 7 for NMT)"}
    )
    mh_sample_epochs: int = field(
        default=26, metadata={"help": "sampling epochs after the burn-in (sec. 6.5: at least 26 for NMT)"}
    )
    mh_chains: int = field(
        default=5, metadata={"help": "independent chains per sentence and target length (sec. 6.5: at least 5)"}
    )
    mh_length_beam: int = field(
        default=1,
        metadata={"help": "the l most probable target lengths of the length predictor, each with its own "
                  "--mh-chains chains; the hypotheses of all lengths are ranked by energy at the end"},
    )
    mh_target_temperature: float = field(
        default=1.0,
        metadata={"help": "temperature T > 0 of the target distribution p(y) ∝ exp(-E(y) / T) at the first "
                  "epoch (sec. 6.8; 1 = the energy model itself)"},
    )
    mh_target_temperature_step: float = field(
        default=0.0,
        metadata={"help": "subtracted from the target temperature once per epoch (linear annealing towards "
                  "the modes, sec. 6.8; Table 6.5 uses 0.02, 0.04, 0.06); 0 = no annealing"},
    )
    mh_target_temperature_floor: float = field(
        default=0.05,
        metadata={"help": "the annealed target temperature never goes below this (> 0; the thesis gives no "
                  "value)"},
    )
    mh_forced_accept_epochs: int = field(
        default=0,
        metadata={"help": "accept every proposal during the first n epochs after the warm start (sec. 6.8: "
                  "2 for Table 6.6); 0 = none"},
    )
    mh_output: OUTPUT_CHOICES = field(
        default="final",
        metadata={"help": "hypotheses: final = each chain's last state; best = each chain's lowest-energy "
                  "state seen; samples = each chain's state after every sample epoch (see --nbest); "
                  "final and best are ranked by energy, lowest first"},
    )
    mh_stats_path: Optional[str] = field(
        default=None,
        metadata={"help": "write per-epoch chain statistics here, one JSON line per decoded batch and epoch "
                  "(truncated when decoding starts); none = not written"},
    )
    mh_max_tokens_per_pass: Optional[int] = field(
        default=None,
        metadata={"help": "memory cap: at most this many target tokens (rows x padded length) per decoder "
                  "forward call; none = all the batch's masked copies in one call"},
    )


def settings_from_config(cfg, seed: int) -> SamplerSettings:
    return SamplerSettings(
        sampler=str(cfg.mh_sampler), energy=str(cfg.mh_energy),
        proposal_temperature=float(cfg.mh_proposal_temperature), top_p=float(cfg.mh_top_p),
        block_size=int(cfg.mh_block_size), block_anneal=bool(cfg.mh_block_anneal), order=str(cfg.mh_order),
        burn_in_epochs=int(cfg.mh_burn_in_epochs), sample_epochs=int(cfg.mh_sample_epochs),
        target_temperature=float(cfg.mh_target_temperature),
        target_temperature_step=float(cfg.mh_target_temperature_step),
        target_temperature_floor=float(cfg.mh_target_temperature_floor),
        forced_accept_epochs=int(cfg.mh_forced_accept_epochs), seed=int(seed),
    )  # fmt: skip


def validate_mh_config(cfg) -> None:
    """Raises ValueError, naming the flag, for MH / Gibbs options that cannot work."""
    if str(cfg.mh_sampler) not in ("mh", "gibbs", "mask_predict"):
        raise ValueError(f"--mh-sampler {cfg.mh_sampler}: choose mh, gibbs or mask_predict")
    settings = settings_from_config(cfg, 1)
    if settings.sampler == "mask_predict":  # the --mh-* options are unused then, but must still be sane
        settings.sampler = "mh"
    check_settings(settings)
    if int(cfg.mh_chains) < 1:
        raise ValueError(f"--mh-chains {cfg.mh_chains}: must be >= 1")
    if int(cfg.mh_length_beam) < 1:
        raise ValueError(f"--mh-length-beam {cfg.mh_length_beam}: must be >= 1")
    if str(cfg.mh_output) not in ("final", "best", "samples"):
        raise ValueError(f"--mh-output {cfg.mh_output}: choose final, best or samples")
    if str(cfg.mh_output) == "samples" and int(cfg.mh_sample_epochs) < 1:
        raise ValueError("--mh-output samples needs --mh-sample-epochs >= 1 (the samples are the sample epochs' states)")
    cap = cfg.mh_max_tokens_per_pass
    if cap is not None and int(cap) < 1:
        raise ValueError(f"--mh-max-tokens-per-pass {cap}: must be >= 1 (or unset for no cap)")
    path = cfg.mh_stats_path
    if path and os.path.isdir(path):
        raise ValueError(f"--mh-stats-path {path}: is a directory; give a file path for the JSON lines")


def check_masked_lm(model, flag: str = "--task translation_mh") -> None:
    """Raises ValueError unless ``model`` is fairseq's CMLMNATransformerModel (or a subclass)."""
    from fairseq.models.nat import CMLMNATransformerModel

    if not isinstance(model, CMLMNATransformerModel):
        raise ValueError(
            f"{flag}: the checkpoint's model is {type(model).__name__}, not a conditional masked LM; MH, Gibbs and "
            "mask-predict decoding need fairseq's cmlm_transformer (--arch cmlm_transformer, trained with --task "
            "translation_lev --noise random_mask --criterion nat_loss)"
        )


# ----------------------------------------------------------------------------------------------------
# Index helpers
# ----------------------------------------------------------------------------------------------------


def top_lengths(length_log_probs: Tensor, src_lengths: Optional[Tensor], offset: bool, l: int, max_len: int,
                min_len: int = 1) -> Tensor:  # fmt: skip
    """The l most probable target lengths T (tokens between BOS and EOS) of each sentence.

    Args:
        length_log_probs: B x 256 log-probs of cmlm_transformer's length classes; a class is the total
            length (BOS and EOS included), or with ``--pred-length-offset`` that minus the source length
            plus 128 (fairseq's ``forward_length_prediction``).
        src_lengths: B source lengths (for the offset).
    Returns:
        B x l, clamped to [min_len, max_len]: a chain needs a position to sample (fairseq allows an empty
        target), and a block proposal needs ``--mh-block-size`` positions, so with blocks of b a predicted
        length below b is raised to b (rather than stopping a test set's decoding at its shortest sentence).
    """
    classes = length_log_probs.topk(min(l, length_log_probs.size(1)), dim=1).indices  # B x l
    total = classes - 128 + src_lengths.unsqueeze(1) if offset else classes
    return (total - 2).clamp(min=min_len, max=max_len)


def chain_layout(lengths: Tensor, sent_ids: Tensor, chains: int):
    """B x l lengths -> per chain (C = B*l*K, sentence-major, then length rank, then chain):
    lengths C, contexts C (sentence index in the batch), ids C x 3 (dataset id, length rank, chain)."""
    b, l = lengths.shape
    dev = lengths.device
    ctx = torch.arange(b, device=dev).view(b, 1, 1).expand(b, l, chains)
    rank = torch.arange(l, device=dev).view(1, l, 1).expand(b, l, chains)
    chain = torch.arange(chains, device=dev).view(1, 1, chains).expand(b, l, chains)
    ids = torch.stack([sent_ids.to(dev).view(b, 1, 1).expand(b, l, chains), rank, chain], dim=-1).reshape(-1, 3)
    return lengths.unsqueeze(-1).expand(b, l, chains).reshape(-1), ctx.reshape(-1), ids


def warm_start(mlm, lengths: Tensor, contexts: Tensor, banned: Tensor, bos: int, eos: int, pad: int) -> Tensor:
    """Algorithm 4, lines 2-3: the greedy fill of ``BOS [MASK]^T EOS`` in one decoder pass (never a banned
    symbol). lengths N, contexts N -> N x (Tmax + 2) tokens."""
    n, tmax = lengths.numel(), int(lengths.max())
    masked = layout_tokens(torch.full((n, tmax), mlm.mask_idx, device=lengths.device), lengths, bos, eos, pad)
    pos = torch.minimum(torch.arange(1, tmax + 1, device=lengths.device).unsqueeze(0), lengths.unsqueeze(1))  # N x T
    logits = mlm(masked, contexts, pos).float().masked_fill(banned, -math.inf)  # N x T x V
    body = logits.argmax(dim=-1)  # N x T
    return layout_tokens(body, lengths, bos, eos, pad)


class MHGenerator(object):
    """MH / degenerate Gibbs decoding of a fairseq CMLM (see the module docstring).

    Args:
        models: a list holding one CMLMNATransformerModel (ensembles are not supported).
        tgt_dict: the target dictionary.
        cfg: any object with the ``mh_*`` fields of :class:`MHGenerationConfig` (the task config).
        seed: the base of every random stream (fairseq's ``--seed``).
    """

    def __init__(self, models, tgt_dict: Dictionary, cfg, seed: int = 1):
        validate_mh_config(cfg)
        if str(cfg.mh_sampler) == "mask_predict":
            raise ValueError("--mh-sampler mask_predict is fairseq's IterativeRefinementGenerator, not this one")
        if models is not None:
            if len(models) != 1:
                raise ValueError(f"--mh-sampler {cfg.mh_sampler} decodes with one model; got an ensemble of {len(models)}")
            check_masked_lm(models[0], f"--mh-sampler {cfg.mh_sampler}")
            longest = models[0].max_decoder_positions() - 2  # BOS and EOS take two positions
            if int(cfg.mh_block_size) > longest:
                raise ValueError(
                    f"--mh-block-size {cfg.mh_block_size} is larger than the longest target the model can decode "
                    f"({longest} tokens between BOS and EOS): lower --mh-block-size"
                )
        self.tgt_dict = tgt_dict
        self.bos, self.pad, self.eos, self.unk = tgt_dict.bos(), tgt_dict.pad(), tgt_dict.eos(), tgt_dict.unk()
        self.settings = settings_from_config(cfg, seed)
        self.chains = int(cfg.mh_chains)
        self.length_beam = int(cfg.mh_length_beam)
        self.output = str(cfg.mh_output)
        self.max_tokens_per_pass = int(cfg.mh_max_tokens_per_pass) if cfg.mh_max_tokens_per_pass else None
        self.stats_path = cfg.mh_stats_path or None
        self.counter = PassCounter()
        if self.stats_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.stats_path)), exist_ok=True)
            open(self.stats_path, "w").close()  # a fresh file per run; lines are appended per batch

    def banned(self, vocab: int, device) -> Tensor:
        banned = torch.zeros(vocab, dtype=torch.bool, device=device)
        banned[[self.bos, self.pad, self.eos, self.unk]] = True
        return banned

    @torch.no_grad()
    def generate(self, models, sample: Dict, prefix_tokens=None, constraints=None, **kwargs) -> List[List[Dict]]:
        """Per sentence of ``sample``, its hypotheses (fairseq's hypothesis dicts)."""
        if prefix_tokens is not None or constraints is not None:
            raise ValueError("MH decoding resamples every position: --prefix-size and constraints are not supported")
        model = models[0] if isinstance(models, (list, tuple)) else models
        check_masked_lm(model, f"--mh-sampler {self.settings.sampler}")
        was_training = model.training
        model.eval()
        try:
            return self._generate(model, sample)
        finally:
            model.train(was_training)

    def _generate(self, model, sample: Dict) -> List[List[Dict]]:
        src_tokens = sample["net_input"]["src_tokens"]
        src_lengths = sample["net_input"]["src_lengths"]
        bsz, dev = src_tokens.size(0), src_tokens.device
        sent_ids = sample["id"] if "id" in sample else torch.arange(bsz)
        encoder_out = model.encoder(src_tokens, src_lengths=src_lengths)
        length_lp = model.decoder.forward_length(normalize=True, encoder_out=encoder_out)  # B x 256
        pad_mask = encoder_out["encoder_padding_mask"]
        src_len = (~pad_mask[0]).sum(dim=1) if len(pad_mask) > 0 else src_tokens.new_full((bsz,), src_tokens.size(1))
        lengths = top_lengths(length_lp, src_len, bool(model.decoder.pred_length_offset), self.length_beam,
                              model.max_decoder_positions() - 2, max(1, self.settings.block_size))  # B x l  # fmt: skip
        lengths, contexts, ids = chain_layout(lengths, sent_ids, self.chains)  # C, C, C x 3

        mlm = CMLMMaskedLM(model, encoder_out, self.max_tokens_per_pass, self.counter)
        banned = self.banned(len(self.tgt_dict), dev)
        firsts = torch.arange(0, lengths.numel(), self.chains, device=dev)  # one warm start per (sentence, length)
        warm = warm_start(mlm, lengths[firsts], contexts[firsts], banned, self.bos, self.eos, self.pad)
        tokens = warm.repeat_interleave(self.chains, dim=0)  # C x L

        sampler = MetropolisHastingsSampler(mlm, self.settings, banned)
        chains = sampler.start(tokens, lengths, contexts, ids)
        s = self.settings
        records = [{
            "epoch": 0, "phase": "warm_start", "chains": chains.num, "acceptance_rate": None, "novel_rate": None,
            "energy_local": float(chains.energy("local").mean()), "energy_raw": float(chains.energy("raw").mean()),
            "target_temperature": float(s.target_temperature), "block_size": int(s.block_size),
        }]  # fmt: skip
        for epoch in range(1, s.total_epochs + 1):
            st = sampler.run_epoch(chains, epoch)
            phase = "burn_in" if epoch <= s.burn_in_epochs else "sample"
            records.append({"epoch": epoch, "phase": phase, **st})
        self._write_stats(records)
        return self._hypotheses(chains, bsz)

    def _write_stats(self, records: List[Dict]) -> None:
        if not self.stats_path:
            return
        keys = ("epoch", "phase", "chains", "acceptance_rate", "novel_rate", "energy_local", "energy_raw",
                "target_temperature", "block_size")  # fmt: skip
        with open(self.stats_path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps({k: rec[k] for k in keys}) + "\n")

    def _hypotheses(self, chains, bsz: int) -> List[List[Dict]]:
        kind = self.settings.energy
        if self.output == "final":
            states = [(chains.tokens, chains.terms_local, chains.terms_raw)]
        elif self.output == "best":
            states = [(chains.best_tokens, chains.best_terms_local, chains.best_terms_raw)]
        else:
            states = chains.samples
        per_sentence = chains.num // bsz
        lengths = chains.lengths.tolist()
        finalized = [[] for _ in range(bsz)]
        for c in range(chains.num):
            b, n = c // per_sentence, lengths[c]
            for tokens, t_local, t_raw in states:
                terms = (t_local if kind == "local" else t_raw)[c, 1 : n + 1].float()  # T
                hyp_tokens = torch.cat([tokens[c, 1 : n + 1], tokens.new_full((1,), self.eos)])  # T + 1
                positional = torch.cat([-terms, terms.new_zeros(1)])  # T + 1
                finalized[b].append({
                    "tokens": hyp_tokens,
                    "score": -terms.sum(),
                    "positional_scores": positional,
                    "alignment": None,
                    "attention": None,
                    "steps": self.settings.total_epochs,
                })  # fmt: skip
        if self.output != "samples":
            for hyps in finalized:
                hyps.sort(key=lambda h: -float(h["score"]))  # lowest energy first (stable: chain order on ties)
        return finalized

