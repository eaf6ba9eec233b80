"""Driving a fairseq autoregressive model on decoder inputs chosen by a training method.

Scheduled-sampling style methods run the decoder on inputs other than the gold prefix.  This module
hides what differs between the model families they support:

* encoder-decoder models (``FairseqEncoderDecoderModel``: transformer, lstm, fconv, ...): decoder
  inputs are ``net_input["prev_output_tokens"]`` and the encoder output can be computed once and
  reused by every pass;
* decoder-only language models (``FairseqLanguageModel``: transformer_lm, lstm_lm, ...): decoder
  inputs are ``net_input["src_tokens"]`` and there is no encoder.

In both, the decoder output at position ``i`` predicts the token fed at position ``i + 1`` (the
teacher-forcing shift); :func:`check_teacher_forcing_shift` verifies it on each batch.

Distributed wrappers: fairseq's ``legacy_ddp`` all-reduces gradients explicitly, so submodules may be
called directly (encoder reuse).  Under torch's DDP (``--ddp-backend pytorch_ddp``/``c10d``) or FSDP,
gradient synchronisation (or parameter gathering) hooks into the wrapper's ``forward``; there the
driver runs every pass through ``model(**net_input)`` instead, recomputing the encoder.
"""
import logging
from typing import Any, Dict, Optional

import torch
from fairseq.distributed import LegacyDistributedDataParallel, ModuleProxyWrapper
from fairseq.modules import LinearizedConvolution
from fairseq.models.transformer import TransformerDecoderBase
from fairseq_ext.modules.embedding_inputs import embeddings_as_inputs
from fairseq.models import (
    BaseFairseqModel,
    FairseqDecoder,
    FairseqEncoderDecoderModel,
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
)

logger = logging.getLogger(__name__)

ENCODER_DECODER = "encoder_decoder"
LANGUAGE_MODEL = "language_model"


# Both errors also derive from RuntimeError: fairseq's Trainer.train_step re-raises a RuntimeError
# as it is, whereas any other exception first makes it write crash.pt into the user's --save-dir.
# These are configuration errors raised on the first batch, before any update: nothing is saved.
class UnsupportedModelError(TypeError, RuntimeError):
    """The model cannot be driven by a scheduled-sampling style criterion."""


class TargetsNotShiftedError(ValueError, RuntimeError):
    """The task's targets are not the decoder inputs shifted by one position."""


def unwrap_model(model):
    """Peels fairseq's ModuleProxyWrapper and any ``.module`` distributed wrappers."""
    inner = model
    while isinstance(inner, ModuleProxyWrapper) or (
        hasattr(inner, "module") and isinstance(getattr(inner, "module"), torch.nn.Module)
    ):
        inner = inner.module
    return inner


def submodules_callable_directly(model) -> bool:
    """True when calling the model's encoder/decoder directly keeps distributed training correct."""
    outer = model.module if isinstance(model, ModuleProxyWrapper) else model
    if outer is unwrap_model(model):
        return True
    return isinstance(outer, LegacyDistributedDataParallel)


def bare_criterion_name(name: str) -> str:
    """The registered name alone: callers may pass ``NAME`` or ``--criterion NAME``; messages add the flag once."""
    name = str(name).strip()
    flag = "--criterion"
    if name.startswith(flag) and name[len(flag) : len(flag) + 1] in (" ", "="):
        name = name[len(flag) + 1 :].strip()
    return name


def method_label(name: str) -> str:
    """How error messages name the method: ``--criterion NAME`` for a criterion (given as ``NAME`` or
    ``--criterion NAME``), or a decoding flag such as ``--soft-beam-decoding`` as it is."""
    name = str(name).strip()
    if name.startswith("--") and bare_criterion_name(name) == name:
        return name
    return f"--criterion {bare_criterion_name(name)}"


def _overrides(obj, name: str, base) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name)


def _same_method(obj, name: str, base) -> bool:
    return not _overrides(obj, name, base)


def adaptive_softmax_log_probs(adaptive_softmax, features: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary of fairseq's ``AdaptiveSoftmax`` (Grave et al., "Efficient
    softmax approximation for GPUs", 2017): ... x D features -> ... x V, with gradient.

    The same values as ``AdaptiveSoftmax.get_log_prob``, which cannot be backpropagated (it adds the
    cluster priors in place to a LogSoftmax output that autograd keeps for its backward pass; fairseq
    trains adaptive softmax only through ``--criterion adaptive_loss``).  The head scores the
    ``cutoff[0]`` frequent words and one entry per tail cluster; word ``y`` of tail cluster ``i`` has
    log p(cluster i) + log p(y | cluster i).
    """
    lead, dim = features.shape[:-1], features.size(-1)
    flat = features.reshape(-1, dim)  # M x D
    head = torch.log_softmax(adaptive_softmax.head(flat), dim=-1)  # M x (cutoff[0] + clusters)
    shortlist = adaptive_softmax.cutoff[0]
    parts = [head[:, :shortlist]]
    for i, tail in enumerate(adaptive_softmax.tail):
        within = torch.log_softmax(tail(flat), dim=-1)  # M x |cluster i|
        parts.append(within + head[:, shortlist + i].unsqueeze(-1))
    return torch.cat(parts, dim=-1).view(*lead, -1)  # ... x V


class DecoderDriver:
    """Runs one model's decoder on arbitrary decoder inputs; built once per model by a criterion.

    Args:
        model: the model the criterion was called with (possibly wrapped for distributed training).
        criterion_name: the registered criterion name, used in error messages as ``--criterion NAME``
            (a leading ``--criterion`` is accepted and dropped, so the flag is never printed twice).
    """

    def __init__(self, model, criterion_name: str):
        self.model = model
        self.inner = unwrap_model(model)
        criterion_name = bare_criterion_name(criterion_name)
        self.criterion_name = criterion_name
        self.kind = model_kind(self.inner, criterion_name)
        self.decoder = self.inner.decoder
        self.direct = submodules_callable_directly(model)
        # extract_features + output_layer lets a pass project only the positions it needs
        self.can_project_subset = _overrides(self.decoder, "extract_features", FairseqDecoder) and _overrides(
            self.decoder, "output_layer", FairseqDecoder
        )
        # fairseq's LinearizedConvolution (fconv) caches a re-laid-out copy of its weight for
        # incremental inference, which cuts the gradient to the weight: step-by-step training
        # re-runs the causal decoder on the whole prefix instead.
        self.incremental_has_gradient = not any(
            isinstance(m, LinearizedConvolution) for m in self.decoder.modules()
        )
        self.adaptive_softmax = getattr(self.decoder, "adaptive_softmax", None)
        stock_normalization = (
            _same_method(self.inner, "get_normalized_probs", BaseFairseqModel)
            and _same_method(self.decoder, "get_normalized_probs", FairseqDecoder)
            and _same_method(self.decoder, "get_normalized_probs_scriptable", FairseqDecoder)
        )
        self.plain_softmax_output = self.adaptive_softmax is None and stock_normalization
        # fairseq's get_normalized_probs with an adaptive softmax is its get_log_prob, which has no
        # backward pass: the same log-probabilities are computed differentiably instead
        self.differentiable_adaptive_softmax = self.adaptive_softmax is not None and stock_normalization
        if not self.direct:
            logger.warning(
                f"{method_label(criterion_name)}: the model is wrapped by {type(model.module if isinstance(model, ModuleProxyWrapper) else model).__name__}, "
                "whose gradient hooks run only through forward(); every pass goes through model(...) and the "
                "encoder is recomputed per pass. --ddp-backend legacy_ddp avoids that cost."
            )

    # -- inputs ---------------------------------------------------------------------------------
    def decoder_inputs(self, sample) -> torch.Tensor:
        """B x T decoder input tokens of the sample."""
        net_input = sample["net_input"]
        return net_input["prev_output_tokens"] if self.kind == ENCODER_DECODER else net_input["src_tokens"]

    def with_decoder_inputs(self, sample, tokens) -> Dict[str, Any]:
        """The sample's net_input with the decoder inputs replaced by ``tokens``."""
        net_input = dict(sample["net_input"])
        net_input["prev_output_tokens" if self.kind == ENCODER_DECODER else "src_tokens"] = tokens
        return net_input

    # -- passes ---------------------------------------------------------------------------------
    def encode(self, sample) -> Optional[Any]:
        """Encoder output to reuse across passes, or None (language model, or wrapped model)."""
        if self.kind != ENCODER_DECODER or not self.direct:
            return None
        net_input = sample["net_input"]
        return self.inner.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])

    def forward(self, sample, tokens, encoder_out=None):
        """Full decoder output (net_output tuple) for decoder inputs ``tokens``: B x T x V logits."""
        if encoder_out is not None:
            return self.decoder(tokens, encoder_out=encoder_out)
        return self.model(**self.with_decoder_inputs(sample, tokens))

    def selected_scores(self, sample, tokens, select, encoder_out=None) -> torch.Tensor:
        """N x V scores at the decoder outputs ``select`` (B x T bool) whose softmax is the model's
        distribution there: the raw logits for a plain softmax output layer (softmax is invariant
        to the per-row log-normaliser, which saves a log_softmax pass), else log-probabilities.

        When the decoder separates features from its output layer, only the selected positions are
        projected onto the vocabulary (the projection and softmax dominate a pass's cost), and the
        causal decoder runs only up to the last selected position.
        """
        if self.direct and self.can_project_subset and (encoder_out is not None or self.kind == LANGUAGE_MODEL):
            width = int(select.any(0).nonzero()[-1]) + 1  # outputs past the last selected one are unused
            features, extra = self.decoder.extract_features(tokens[:, :width], encoder_out=encoder_out)  # B x W x D
            outputs = self.decoder.output_layer(features[select[:, :width]])  # N x C
        else:
            outputs, extra = self.forward(sample, tokens, encoder_out)  # B x T x C
            outputs = outputs[select]  # N x C
        return self.selected_output_scores(outputs, extra)

    def selected_output_scores(self, outputs: torch.Tensor, extra=None) -> torch.Tensor:
        """N x V scores (as :meth:`selected_scores`) of N x C selected decoder outputs, with gradient.

        C is V for a plain output layer; for an adaptive softmax the output layer returns its input
        features (C = D), which :meth:`log_probs` projects.  fairseq's get_normalized_probs (and the
        adaptive softmax's get_log_prob) unpack B x T x C, so the N rows travel as 1 x N x C.
        """
        if self.plain_softmax_output:
            return outputs
        return self.log_probs((outputs.unsqueeze(0), extra)).squeeze(0)  # N x V

    def step(self, prefix, encoder_out, incremental_state):
        """One decoder step on ``prefix`` (B x t): B x C output for the last position, with gradient.

        Incremental (cached) decoding where it keeps gradients; otherwise, or when ``incremental_state``
        is None, the full causal prefix.
        """
        if self.incremental_has_gradient and incremental_state is not None:
            out, _ = self.decoder(prefix, encoder_out=encoder_out, incremental_state=incremental_state)
        else:
            out, _ = self.decoder(prefix, encoder_out=encoder_out)
        return out[:, -1]

    def log_probs(self, net_output) -> torch.Tensor:
        """B x T x V log-probabilities of a net_output whose first element is B x T x C, with gradient."""
        if self.differentiable_adaptive_softmax:
            return adaptive_softmax_log_probs(self.adaptive_softmax, net_output[0])
        return self.inner.get_normalized_probs(net_output, log_probs=True)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """N x V scores whose softmax is the model's distribution, from N x C decoder outputs, with
        gradient: the outputs themselves for a plain softmax layer, else log-probabilities."""
        return self.selected_output_scores(outputs)

    # -- inputs given as embedding vectors (relaxations) ----------------------------------------
    def input_embedding_matrix(self) -> torch.Tensor:
        """The V x D matrix whose rows the decoder embeds tokens with: soft embeddings mix its rows.

        Raises UnsupportedModelError for decoders without a plain embedding table (adaptive input,
        character embeddings), where a mixture of token embeddings is not defined.
        """
        embed = getattr(self.decoder, "embed_tokens", None)
        weight = getattr(embed, "weight", None)
        if not isinstance(embed, torch.nn.Embedding) or weight is None or weight.dim() != 2:
            raise UnsupportedModelError(
                f"{method_label(self.criterion_name)} feeds the decoder mixtures of its token embeddings, so the "
                f"decoder needs a plain embedding table (torch.nn.Embedding as decoder.embed_tokens); "
                f"{type(self.decoder).__name__} has {type(embed).__name__}. Drop --adaptive-input / character "
                "embeddings or choose another --arch."
            )
        return weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x T x D embeddings of ``tokens``, the decoder's own lookup (with gradient)."""
        return self.decoder.embed_tokens(tokens)

    def forward_from_embeddings(self, sample, tokens, vectors, encoder_out=None):
        """:meth:`forward` with the decoder fed ``vectors`` (B x T x D) in place of the embeddings of ``tokens``."""
        with embeddings_as_inputs(self.decoder, vectors):
            return self.forward(sample, tokens, encoder_out)

    def selected_scores_from_embeddings(self, sample, tokens, vectors, select, encoder_out=None) -> torch.Tensor:
        """:meth:`selected_scores` with the decoder fed ``vectors``, keeping the graph."""
        width = tokens.size(1)
        if self.direct and self.can_project_subset and (encoder_out is not None or self.kind == LANGUAGE_MODEL):
            width = int(select.any(0).nonzero()[-1]) + 1  # the causal decoder needs no later inputs
        with embeddings_as_inputs(self.decoder, vectors[:, :width]):
            return self.selected_scores(sample, tokens[:, :width], select[:, :width], encoder_out)

    def selected_candidate_scores_from_embeddings(
        self, sample, tokens, vectors, select, rank, top_k: int, encoder_out=None
    ):
        """Scores of ``top_k`` candidates per selected output, for a relaxation restricted to them.

        ``rank(scores)`` maps the N x V scores (no gradient) to the values whose top ``top_k`` are the
        candidates (e.g. scores plus Gumbel noise, padding at -inf).  Returns (N x k scores with
        gradient, N x k candidate ids).  When the decoder's output layer is a known linear map, only
        the candidates' rows of it enter the graph, so the backward pass skips the N x V x D
        projection gradient; otherwise the full scores are computed with gradient and gathered.
        """
        linear = self.output_linear()
        width = int(select.any(0).nonzero()[-1]) + 1
        if linear is not None and self.direct and self.can_project_subset and (
            encoder_out is not None or self.kind == LANGUAGE_MODEL
        ):
            with embeddings_as_inputs(self.decoder, vectors[:, :width]):
                features, _ = self.decoder.extract_features(tokens[:, :width], encoder_out=encoder_out)
            features = features[select[:, :width]]  # N x D
            weight, bias = linear
            with torch.no_grad():
                candidates = rank(torch.nn.functional.linear(features, weight, bias)).topk(top_k, dim=-1).indices
            scores = torch.einsum("nd,nkd->nk", features, weight[candidates])  # N x k
            if bias is not None:
                scores = scores + bias[candidates]
            return scores, candidates
        scores = self.selected_scores_from_embeddings(sample, tokens, vectors, select, encoder_out)  # N x V
        with torch.no_grad():
            candidates = rank(scores.detach()).topk(top_k, dim=-1).indices
        return scores.gather(-1, candidates), candidates

    def output_linear(self):
        """(weight V x D, bias or None) when the decoder's output layer is ``features @ weight.T + bias``
        and its softmax is the model's distribution; else None."""
        if not self.plain_softmax_output:
            return None
        projection = getattr(self.decoder, "output_projection", None)
        # fairseq's transformer decoders project with output_projection; another decoder can declare
        # that its output_layer is exactly its output_projection (LINEAR_OUTPUT_PROJECTION = True)
        linear_output = (
            isinstance(self.decoder, TransformerDecoderBase) and _same_method(self.decoder, "output_layer", TransformerDecoderBase)
        ) or getattr(self.decoder, "LINEAR_OUTPUT_PROJECTION", False)
        if linear_output and isinstance(projection, torch.nn.Linear):
            return projection.weight, projection.bias
        return None

    def step_from_embeddings(self, prefix, prefix_vectors, encoder_out, incremental_state):
        """:meth:`step` with the decoder fed ``prefix_vectors`` (B x t x D): B x C output, with gradient."""
        with embeddings_as_inputs(self.decoder, prefix_vectors):
            return self.step(prefix, encoder_out, incremental_state)


def model_kind(model, criterion_name: str) -> str:
    """ENCODER_DECODER or LANGUAGE_MODEL; raises UnsupportedModelError naming what to do otherwise."""
    criterion_name = bare_criterion_name(criterion_name)
    name = type(model).__name__
    try:
        from fairseq.models.nat import FairseqNATModel
    except ImportError:  # pragma: no cover - fairseq without NAT models
        FairseqNATModel = ()
    if isinstance(model, FairseqNATModel):
        raise UnsupportedModelError(
            f"{method_label(criterion_name)} feeds an autoregressive decoder its own predictions, but "
            f"{name} is non-autoregressive (it predicts all target tokens at once). Use an autoregressive "
            "--arch (transformer, lstm, fconv, or transformer_lm on --task language_modeling)."
        )
    if isinstance(model, FairseqEncoderDecoderModel):
        kind = ENCODER_DECODER
    elif isinstance(model, FairseqLanguageModel):
        kind = LANGUAGE_MODEL
    else:
        raise UnsupportedModelError(
            f"{method_label(criterion_name)} needs an encoder-decoder model whose decoder takes "
            f"prev_output_tokens (FairseqEncoderDecoderModel) or a decoder-only language model "
            f"(FairseqLanguageModel); got {name}. Choose an --arch such as transformer, lstm, fconv or transformer_lm."
        )
    if not isinstance(model.decoder, FairseqIncrementalDecoder):
        raise UnsupportedModelError(
            f"{method_label(criterion_name)} needs a causal, step-by-step decoder (FairseqIncrementalDecoder); "
            f"{name}'s decoder is {type(model.decoder).__name__}. Choose an autoregressive --arch "
            "(transformer, lstm, fconv, transformer_lm)."
        )
    return kind


def check_teacher_forcing_shift(inputs, target, pad: int, criterion_name: str):
    """Raises unless target[:, i] == inputs[:, i + 1] wherever both are tokens (the teacher-forcing shift).

    The methods replace input ``i + 1`` by a prediction made at position ``i``; a task whose targets
    are not the inputs shifted left (e.g. language_modeling with --self-target) breaks that.
    """
    criterion_name = bare_criterion_name(criterion_name)
    nxt = inputs[:, 1:]  # B x (T-1)
    tgt = target[:, : nxt.size(1)]
    both = nxt.ne(pad) & tgt.ne(pad)
    if not torch.equal(nxt[both], tgt[both]):
        raise TargetsNotShiftedError(
            f"{method_label(criterion_name)}: the targets are not the decoder inputs shifted by one position, "
            "so a prediction cannot be fed back as the next input. Use a task whose targets follow the inputs "
            "(translation; language_modeling with its default future targets, not --self-target or --past-target)."
        )
