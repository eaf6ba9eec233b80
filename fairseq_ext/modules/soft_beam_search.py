"""The continuous relaxation of beam search (Goyal, Continuous relaxation of beam search, thesis chapter 4,
Algorithm 3) over a fairseq encoder-decoder model, for training (the soft beam search loss) and decoding
(section 4.3.4).

Beam search (Algorithm 1) keeps k beam elements.  At step t each element i proposes successor
scores ``s~_t[i, w] = s_{t,i} + f(h_{t,i}, w)``; the k best (element, word) pairs are kept, the
chosen words are fed back and each new element continues the decoder state of its parent (fairseq:
``reorder_incremental_state`` with an ``index_select``).  Algorithm 3 replaces every discrete choice
by its relaxation (Algorithm 2, :func:`fairseq_ext.modules.soft_top_k.continuous_top_k_argmax`):

    p_1..p_k      = continuous-top-k-argmax(s~_t)            B x k x K x V   (line 7)
    b~_{t,i}      = row sums of p_i                            B x k x K       (line 9: soft backpointer)
    a_i           = column sums of p_i                         B x k x V       (line 10)
    e_{t+1,i}     = a_i^T E                                    soft input embedding (line 11)
    D_{t+1,i}     = a_i . d_t + sum_j b~_{t,i}[j] D_{t,j}       running decomposable loss (lines 12, 17)
    s_{t+1,i}     = sum(s~_t * p_i)                            running score (line 13)
    h~_{t,i}      = sum_j b~_{t,i}[j] h_{t,j}                  decoder state mixing (lines 14-16)
    L             = peaked-softmax_alpha(s_T) . D_T            (line 19)

Decoder state mixing is done where fairseq's beam search does an ``index_select``: the decoder's own
``reorder_incremental_state`` is called with a :class:`SoftReorder`, an index tensor that turns
``x.index_select(0, order)`` into the convex combination ``sum_j b~[i, j] x_j``.  So every cached
tensor of every fairseq incremental decoder is mixed: LSTM hidden and cell states (and input
feeding), and the transformer's per-layer key/value caches of all previous positions.  With one-hot
backpointers the mixing is exactly the hard reordering (tested).

Choices the thesis leaves open (documented here, tested):

* Initial beam: Algorithm 1 starts k identical elements, whose k x V successors tie k-fold.  As
  fairseq's SequenceGenerator does, only the first element is expanded at step 0 (K = 1 there).
* Hard path: along with the soft quantities the joint argmax (element, word) of each p_i is kept
  (section 4.3.4's "MAP estimate of the soft backpointers"); following these hard backpointers
  gives each element's token sequence, used for soft beam decoding and for logging.
* Lengths.  Tagging (``fixed_length``): exactly ``horizon`` steps, EOS banned before the last and
  forced at it.  Translation: ``horizon`` steps (e.g. gold length + margin) with finished
  hypotheses absorbing: an element whose hard path has emitted EOS extends only with EOS at local
  score 0, as hard beam search with absorbing final states would; the gold is EOS-padded to the
  horizon, so Hamming costs count missing and extra tokens alike.  A sentence whose horizon is
  reached keeps its scores and losses (the other sentences of the batch go on), so a sentence's
  loss does not depend on its batch.  A sentence all of whose elements have finished stops too
  (more soft mixing would only blend finished elements): the EOS costs of its remaining steps,
  the same for every element, are added to its losses.
* Tokens a hypothesis may not contain (padding, BOS, and for tagging every non-label) get the
  finite score ``BANNED_SCORE`` rather than -inf, so that ``s~ * p`` stays 0 where p = 0.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from fairseq_ext.modules.decoder_driver import DecoderDriver, UnsupportedModelError
from fairseq_ext.modules.embedding_inputs import decode_from_embeddings, soft_embeddings
from fairseq_ext.modules.soft_top_k import continuous_top_k_argmax, soft_backpointers_and_words, usable_alpha

# Far below any reachable score, yet finite: its squared distance to a real score (~1e18) is finite
# in float32 and its softmax weight underflows to exactly 0.
BANNED_SCORE = -1e9
LOCAL, GLOBAL = "local", "global"


# -- state mixing ------------------------------------------------------------------------------
def mix_beam_rows(x: Tensor, weights: Tensor) -> Tensor:
    """(B*K) x ... rows, B x k x K convex weights -> (B*k) x ... rows ``sum_j weights[b, i, j] x[b*K + j]``."""
    bsz, k, width = weights.shape
    rows = x.reshape(bsz, width, -1)  # B x K x F
    mixed = torch.bmm(weights.to(x.dtype), rows)  # B x k x F
    return mixed.reshape((bsz * k,) + tuple(x.shape[1:]))


class SoftReorder(torch.Tensor):
    """A (B*k) LongTensor of hard beam indices (the MAP backpointers) that also carries soft
    backpointers ``weights`` (B x k x K).

    ``x.index_select(0, order)`` with a floating-point ``x`` returns the convex combination
    :func:`mix_beam_rows` instead of the hard selection; integer and boolean tensors (padding masks,
    identical across the beam of a sentence) are selected with the hard indices.  Every other
    operation sees a plain tensor of hard indices.
    """

    @staticmethod
    def __new__(cls, hard_order: Tensor, weights: Tensor):
        order = hard_order.as_subclass(cls)
        order.soft_weights = weights
        return order

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.index_select, torch.index_select):
            source, dim, index = _index_select_arguments(args, kwargs)
            if isinstance(index, SoftReorder):
                return index.select_rows(source, dim)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def hard(self) -> Tensor:
        return self.as_subclass(torch.Tensor)

    def select_rows(self, source: Tensor, dim: int) -> Tensor:
        source = source.as_subclass(torch.Tensor) if isinstance(source, SoftReorder) else source
        if not source.is_floating_point():
            return source.index_select(dim, self.hard())
        if dim != 0:
            return mix_beam_rows(source.movedim(dim, 0), self.soft_weights).movedim(0, dim)
        return mix_beam_rows(source, self.soft_weights)


def _index_select_arguments(args, kwargs):
    names = ("input", "dim", "index")
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    return values["input"], values["dim"], values["index"]


def soft_reorder_incremental_state(decoder, incremental_state, weights: Tensor) -> None:
    """Mixes every cached decoder state by the soft backpointers ``weights`` (B x k x K, lines 14-16)."""
    bsz, k, width = weights.shape
    hard = weights.argmax(-1) + torch.arange(bsz, device=weights.device).unsqueeze(1) * width  # B x k
    decoder.reorder_incremental_state_scripting(incremental_state, SoftReorder(hard.flatten(), weights))


# -- the math of one step (Algorithm 3, lines 5-17) --------------------------------------------
def soft_beam_step(
    running_scores: Tensor, local_scores: Tensor, running_losses: Tensor, step_costs: Tensor,
    beam_size: int, alpha: float, cost_augmented: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One relaxed beam step.

    Args:
        running_scores: B x K scores s_{t,i} of the current elements.
        local_scores: B x K x V successor scores f(h_{t,i}, w).
        running_losses: B x K running losses D_{t,i}.
        step_costs: B x V costs d_t(w) of emitting w at this step.
        cost_augmented: add d_t(w) to the successor scores (the hinge variant, section 4.4).
    Returns:
        new scores B x k (line 13), new losses B x k (lines 12 + 17), soft backpointers B x k x K
        (line 9), soft words B x k x V (line 10), and the relaxed picks p B x k x K x V (line 7).
    """
    candidates = running_scores.unsqueeze(-1) + local_scores  # B x K x V   (line 5)
    if cost_augmented:
        candidates = candidates + step_costs.unsqueeze(1)  # section 4.4: s~ + d(w)
    picks = continuous_top_k_argmax(candidates, beam_size, alpha)  # B x k x K x V   (line 7)
    backpointers, words = soft_backpointers_and_words(picks)  # B x k x K, B x k x V
    new_losses = torch.einsum("biv,bv->bi", words, step_costs) + torch.einsum(
        "bij,bj->bi", backpointers, running_losses
    )  # lines 12 and 17
    new_scores = torch.einsum("bjv,bijv->bi", candidates, picks)  # line 13
    return new_scores, new_losses, backpointers, words, picks


def soft_select(final_scores: Tensor, values: Tensor, alpha: float) -> Tensor:
    """peaked-softmax_alpha(s_T) . values: B x k, B x k -> B (line 19; the hinge's s_max with values = s_T).

    The maximum is subtracted first and alpha capped (``usable_alpha``), so that no alpha overflows."""
    shifted = final_scores - final_scores.max(-1, keepdim=True).values.detach()  # B x k, <= 0
    return (torch.softmax(usable_alpha(alpha) * shifted, -1) * values).sum(-1)


def hamming_step_costs(gold_at_step: Tensor, label_weights: Tensor) -> Tensor:
    """d_t(w) = c_w [w != y*_t]: B gold tokens, V weights c -> B x V (the thesis's Hamming cost with the
    per-label weights of section 4.5.1: predicting a wrong 'O' costs 2)."""
    costs = label_weights.unsqueeze(0).expand(gold_at_step.size(0), -1).clone()  # B x V
    costs.scatter_(1, gold_at_step.unsqueeze(1), 0.0)
    return costs


def gold_padded_with_eos(target: Tensor, pad: int, eos: int, steps: int) -> Tensor:
    """B x T targets -> B x ``steps`` with padding and everything past T replaced by EOS."""
    bsz, length = target.shape
    out = target.new_full((bsz, max(steps, length)), eos)
    out[:, :length] = target.masked_fill(target.eq(pad), eos)
    return out[:, :steps]


# -- running it over a fairseq model -----------------------------------------------------------
@dataclass
class SoftBeamResult:
    scores: Tensor  # B x k running model scores s_T (cost-augmented with cost_augmented=True)
    losses: Optional[Tensor]  # B x k running losses D_T (None without costs)
    tokens: Tensor  # B x k x T hard path of each element; EOS once finished, pad past the sentence's horizon
    positional_scores: Tensor  # B x k x T local scores of those tokens along the hard path (0 at pad)


StepCosts = Union[Tensor, Callable[[int], Tensor]]  # B x T x V, or t -> B x V


class SoftBeamSearch:
    """Algorithm 3 over a fairseq encoder-decoder model with an incremental decoder.

    Args:
        model: the (possibly distributed-wrapped) model.
        tgt_dict: target dictionary (pad, bos, eos ids).
        beam_size: k.
        normalization: ``local``: log-softmax successor scores (search-aware training of locally
            normalised models); ``global``: the decoder's raw scores (section 5.2).
        allowed: V bool of the tokens a hypothesis may contain (default: all but padding and BOS);
            EOS is always allowed.
        name: the bare registered name of the criterion (``soft_beam_loss``); the model checks shared
            with the other criterions write it as ``--criterion NAME``.
        label: what to call the method in this class's own error messages (default ``--criterion NAME``).
    """

    def __init__(self, model, tgt_dict, beam_size: int, normalization: str = LOCAL,
                 allowed: Optional[Tensor] = None, name: str = "soft_beam_loss",
                 label: Optional[str] = None):  # fmt: skip
        label = label or f"--criterion {name}"
        if beam_size < 1:
            raise ValueError(f"{label}: the beam size must be >= 1, got {beam_size}")
        if normalization not in (LOCAL, GLOBAL):
            raise ValueError(f"{label}: normalization must be '{LOCAL}' or '{GLOBAL}', got {normalization!r}")
        self.driver = DecoderDriver(model, label)
        self.name = label
        if self.driver.kind != "encoder_decoder":
            raise UnsupportedModelError(
                f"{label} decodes a target from a source: it needs an encoder-decoder model "
                f"(--arch transformer, lstm, seq2seq_tagger_*), not {type(self.driver.inner).__name__}"
            )
        if not self.driver.incremental_has_gradient:
            raise UnsupportedModelError(
                f"{label} mixes the beam elements' incremental decoder states, which "
                f"{type(self.driver.decoder).__name__} (fconv's linearized convolutions) does not keep with "
                "gradients: choose --arch transformer, lstm or seq2seq_tagger_*"
            )
        if not self.driver.direct:
            raise UnsupportedModelError(
                f"{label} steps the decoder directly, which torch DDP/FSDP wrappers do not synchronise: "
                "use --ddp-backend legacy_ddp"
            )
        if normalization == GLOBAL and getattr(self.driver.decoder, "adaptive_softmax", None) is not None:
            raise UnsupportedModelError(
                f"{label} with global normalization scores with the decoder's raw output scores, which an "
                "adaptive softmax does not produce: drop --adaptive-softmax-cutoff or use local normalization"
            )
        self.beam_size = beam_size
        self.normalization = normalization
        self.pad, self.bos, self.eos = tgt_dict.pad(), tgt_dict.bos(), tgt_dict.eos()
        vocab = len(tgt_dict)
        if allowed is None:
            allowed = torch.ones(vocab, dtype=torch.bool)
            allowed[[self.pad, self.bos]] = False
        allowed = allowed.clone()
        allowed[self.eos] = True
        self.allowed = allowed
        if beam_size > int(allowed.sum()):
            # the first step expands one element: extra elements could only start with banned tokens, and past
            # the vocabulary size top-k has no entry left to pick
            raise ValueError(
                f"{label}: the beam size {beam_size} exceeds the {int(allowed.sum())} tokens a hypothesis may "
                f"start with (EOS included); use a beam size of at most {int(allowed.sum())}"
            )

    def local_scores(self, decoder_out) -> Tensor:
        """N x V successor scores f(h, w) from the decoder's N x 1 x V output."""
        return self._scores((decoder_out[0][:, -1:], decoder_out[1])).squeeze(1)

    def _scores(self, net_output) -> Tensor:
        """B x T x V local scores: raw (global) or log-normalised (local), in float32 at least (fairseq's
        own log_softmax casts to float32, which would make float64 gradient checks meaningless)."""
        logits = _at_least_float32(net_output[0])
        if self.normalization == GLOBAL:
            return logits
        if getattr(self.driver.decoder, "adaptive_softmax", None) is None:
            return torch.log_softmax(logits, dim=-1)
        return _at_least_float32(self.driver.log_probs(net_output))

    def gold_scores(self, sample) -> Tensor:
        """B teacher-forced scores s(y*) = sum_t f(h*_t, y*_t) of the gold targets (for the hinge)."""
        net_output = self.driver.model(**sample["net_input"])
        scores = self._scores(net_output)  # B x T x V
        target = sample["target"]
        picked = scores.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # B x T
        return picked.masked_fill(target.eq(self.pad), 0.0).sum(-1)

    def run(self, src_tokens: Tensor, src_lengths: Tensor, horizons: Tensor, alpha: float,
            step_costs: Optional[StepCosts] = None, cost_augmented: bool = False, fixed_length: bool = False,
            encoder_out=None, stop_when_finished: bool = False) -> SoftBeamResult:  # fmt: skip
        """Runs the relaxed beam for ``horizons`` (B) steps per sentence (the EOS step included).

        ``step_costs``: the decomposable costs d_t(w), B x T x V or a callable t -> B x V (None: no
        loss is tracked).  ``stop_when_finished``: stop once every hard path has emitted EOS
        (decoding; training runs to the horizon so that the loss covers it).
        """
        if cost_augmented and step_costs is None:
            raise ValueError(f"{self.name}: cost-augmented scores need step costs")
        model, decoder, k = self.driver.inner, self.driver.decoder, self.beam_size
        bsz, device = src_tokens.size(0), src_tokens.device
        if encoder_out is None:
            encoder_out = model.encoder(src_tokens, src_lengths=src_lengths)
        encoder_out = model.encoder.reorder_encoder_out(
            encoder_out, torch.arange(bsz, device=device).repeat_interleave(k)
        )  # every sentence's encoding repeated for its k elements
        embedding = self.driver.input_embedding_matrix()  # V x D
        vocab = embedding.size(0)
        allowed = self.allowed.to(device)
        horizons = horizons.to(device)
        steps = int(horizons.max())

        incremental_state = {}
        prefix = torch.full((bsz * k, 1), self.eos, dtype=torch.long, device=device)  # fairseq starts with EOS
        newest = embedding[self.eos].expand(bsz * k, -1)  # (B*k) x D: the input of the newest position
        dtype = torch.promote_types(embedding.dtype, torch.float32)  # scores in float32 at least
        scores = torch.zeros(bsz, 1, device=device, dtype=dtype)  # only the first element is expanded at step 0
        losses = torch.zeros(bsz, 1, device=device, dtype=dtype)
        history = torch.zeros(bsz, 1, 0, dtype=torch.long, device=device)  # hard paths, B x K x t
        path_scores = torch.zeros(bsz, 1, 0, device=device, dtype=dtype)
        finished = torch.zeros(bsz, 1, dtype=torch.bool, device=device)
        own = torch.arange(k, device=device).unsqueeze(0)  # 1 x k
        for t in range(steps):
            width = scores.size(1)
            # incremental decoders embed only the newest input (the older ones live in the mixed
            # caches), so the prefix's vectors can be a view of the newest one
            vectors = newest.unsqueeze(1).expand(-1, prefix.size(1), -1)  # (B*k) x t x D
            decoder_out = decode_from_embeddings(decoder, vectors, prefix, encoder_out, incremental_state)
            local = self.local_scores(decoder_out).view(bsz, k, vocab)[:, :width]  # B x K x V
            local = self._restrict(local, t, horizons, finished, fixed_length, allowed)
            costs = self._costs_at(step_costs, t, bsz, vocab, device, dtype)  # B x V
            new_scores, new_losses, backpointers, words, picks = soft_beam_step(
                scores, local, losses, costs, k, alpha, cost_augmented
            )
            within = (horizons > t).unsqueeze(1)  # B x 1: the sentence's horizon is not reached
            done = finished.all(1, keepdim=True)  # B x 1: every element's hard path has emitted EOS
            active = within & ~done
            # A finished sentence stops (further soft mixing would only blend its finished elements),
            # but, as in the hard limit, each of its elements goes on emitting EOS at score 0 until the
            # horizon, paying d_t(EOS) (and adding it to the score when cost-augmented): the same shift
            # for every element, which is added here.
            eos_cost = torch.where(within & done, costs[:, self.eos : self.eos + 1], torch.zeros_like(costs[:, :1]))
            scores = torch.where(active, new_scores, _widen(scores, k) + (eos_cost if cost_augmented else 0.0))
            losses = torch.where(active, new_losses, _widen(losses, k) + eos_cost)

            # the hard path: the joint argmax (element, word) of each p_i; frozen sentences keep theirs
            flat = picks.detach().flatten(2).argmax(-1)  # B x k
            parent = torch.where(active, torch.div(flat, vocab, rounding_mode="floor"), own.clamp(max=width - 1))
            absorbed = torch.where(within, torch.full_like(flat, self.eos), torch.full_like(flat, self.pad))
            word = torch.where(active, flat % vocab, absorbed)
            step_score = local.detach().flatten(1).gather(1, parent * vocab + word).masked_fill(~active, 0.0)
            history = torch.cat([_rows(history, parent), word.unsqueeze(-1)], dim=2)  # B x k x (t+1)
            path_scores = torch.cat([_rows(path_scores, parent), step_score.unsqueeze(-1)], dim=2)
            finished = finished.gather(1, parent) | word.eq(self.eos)
            if t + 1 == steps:
                break
            if not bool(active.any()):  # every sentence finished: no more decoding is needed
                if not stop_when_finished:
                    scores, losses, history, path_scores = self._absorb_until_horizons(
                        t + 1, steps, horizons, step_costs, cost_augmented, scores, losses, history, path_scores
                    )
                break

            # lines 11 and 14-16: the next inputs and the mixed decoder states
            identity = torch.eye(k, width, device=device, dtype=backpointers.dtype).unsqueeze(0)  # a frozen sentence keeps its own
            mixing = torch.where(active.unsqueeze(-1), backpointers, identity)  # B x k x K
            if width < k:  # step 0: the other elements' (identical) states get weight 0
                mixing = torch.cat([mixing, mixing.new_zeros(bsz, k, k - width)], dim=-1)
            soft_reorder_incremental_state(decoder, incremental_state, mixing)
            newest = soft_embeddings(words, embedding).view(bsz * k, -1)  # e_{t+1,i} = a_i^T E
            prefix = torch.cat([prefix, prefix.new_full((bsz * k, 1), self.eos)], dim=1)

        return SoftBeamResult(
            scores=scores, losses=None if step_costs is None else losses,
            tokens=history, positional_scores=path_scores,
        )

    def _restrict(self, local: Tensor, t: int, horizons: Tensor, finished: Tensor, fixed_length: bool,
                  allowed: Tensor) -> Tensor:  # fmt: skip
        """Bans the tokens a hypothesis cannot contain at step t and makes finished elements absorbing."""
        bsz, width, vocab = local.shape
        may = allowed.view(1, 1, vocab).expand(bsz, width, vocab).clone()
        if fixed_length:
            last = (horizons - 1 == t).view(bsz, 1, 1)  # only EOS at the last step, never before it
            eos_only = torch.zeros(vocab, dtype=torch.bool, device=local.device)
            eos_only[self.eos] = True
            may = torch.where(last, eos_only.view(1, 1, vocab), may)
            may[..., self.eos] = last.view(bsz, 1).expand(bsz, width)
        local = local.masked_fill(~may, BANNED_SCORE)
        if finished.any():  # absorbing: EOS at score 0, nothing else
            absorbed = torch.full_like(local, BANNED_SCORE)
            absorbed[..., self.eos] = 0.0
            local = torch.where(finished.unsqueeze(-1), absorbed, local)
        return local

    def _absorb_until_horizons(self, start, steps, horizons, step_costs, cost_augmented, scores, losses,
                               history, path_scores):  # fmt: skip
        """Steps ``start..steps-1`` for sentences whose elements have all finished: every element emits EOS
        at score 0 and pays d_t(EOS) until its sentence's horizon (as the loop would, without decoding)."""
        bsz, k = scores.shape
        for t in range(start, steps):
            within = (horizons > t).unsqueeze(1)  # B x 1
            costs = self._costs_at(step_costs, t, bsz, 1 + self.eos, scores.device, scores.dtype)
            eos_cost = torch.where(within, costs[:, self.eos : self.eos + 1], torch.zeros_like(costs[:, :1]))
            losses = losses + eos_cost
            if cost_augmented:
                scores = scores + eos_cost
            token = torch.where(within, torch.full_like(within, self.eos, dtype=torch.long),
                                torch.full_like(within, self.pad, dtype=torch.long))  # fmt: skip
            history = torch.cat([history, token.expand(bsz, k).unsqueeze(-1)], dim=2)
            path_scores = torch.cat([path_scores, path_scores.new_zeros(bsz, k, 1)], dim=2)
        return scores, losses, history, path_scores

    @staticmethod
    def _costs_at(step_costs, t, bsz, vocab, device, dtype) -> Tensor:
        if step_costs is None:
            return torch.zeros(bsz, vocab, device=device, dtype=dtype)
        costs = step_costs(t) if callable(step_costs) else step_costs[:, t]
        return costs.to(dtype)


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rows(x: Tensor, parent: Tensor) -> Tensor:
    """B x K x t per-element histories -> B x k x t histories of the chosen parents (B x k)."""
    return x.gather(1, parent.unsqueeze(-1).expand(-1, -1, x.size(2)))


def _widen(x: Tensor, k: int) -> Tensor:
    """B x K ... -> B x k ...: repeats the rows when K = 1 < k (before the first expansion)."""
    if x.size(1) == k:
        return x
    return x.expand(x.size(0), k, *x.shape[2:]).contiguous() if x.size(1) == 1 else x
