"""The mathematics of MLE-guided parameter search (MGS), as pure functions of tensors.

Welleck and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence
Modeling" (AAAI 2021), section 2 and Algorithm 1.  One update:

* the proposal (eq. 4) is a mixture of two Gaussians over update directions,
  q(Delta) = pi N(Delta | 0, sigma^2 I) + (1 - pi) N(Delta | m, sigma^2 I), with m the MLE step.
  The paper writes the second mean as grad L_MLE; since candidates are evaluated at theta + Delta,
  the mean that moves towards higher likelihood is the descent step m = -clip(grad L_MLE), which is
  what the authors' code uses;
* candidates Delta_k ~ q, k = 1..K, each scored by the pooled task loss C(theta + Delta_k);
* self-normalised importance weights (eq. 3, Appendix A.1 eq. 9):
  w_k proportional to exp(alpha (C(theta) - C(theta + Delta_k))) / q(Delta_k);
* the update direction is Delta_MGS = sum_k w_k Delta_k.

Noise scale (Appendix A.4): per weight tensor, sigma_p = noise * mean |g_p| of the (clipped) MLE
gradient g ("tensor", the paper's choice for its experiments), one sigma = noise * mean |g| for all
tensors ("global", the first rule stated in A.4), or sigma = noise ("constant", an option of the
authors' code).

Proposal density: ``exact`` is eq. 4 with the real sigmas (its normalising constant, the same for
every candidate, cancels in the weights and is omitted); ``unit`` is what the authors' code
evaluates: the same mixture with unit variances, log(pi exp(-|Delta|^2/2) + (1-pi) exp(-|Delta-m|^2/2));
``none`` drops the correction (w_k proportional to exp(alpha (C(theta) - C(theta + Delta_k)))).
Note on ``exact``: for D parameters, -log N(Delta_k | mean, sigma^2) = |eps_k|^2 / 2 + const with
|eps_k|^2 ~ chi^2_D, whose spread (about sqrt(D/2) nats) dwarfs alpha times any task-loss difference
once D is large; the weights then follow the noise norms rather than the task loss.

Memory (Appendix A.3): a candidate is never stored.  Every Delta_k is regenerated tensor by tensor
from a seed derived from (seed, update, micro-batch, k, tensor index) and its component, so a
candidate costs one tensor at a time, and all data-parallel workers draw the same candidates.
Restoring theta after a candidate is a copy from a single snapshot of the parameters (adding and
subtracting Delta in floating point does not give theta back bit for bit).
"""
import math
from dataclasses import dataclass
from typing import Iterable, List, Sequence

import torch
from fairseq.dataclass import ChoiceEnum

NOISE_SCALE_CHOICES = ChoiceEnum(["tensor", "global", "constant"])
DENSITY_CHOICES = ChoiceEnum(["unit", "exact", "none"])
ASSIGNMENT_CHOICES = ChoiceEnum(["sample", "alternate"])

_MASK64 = (1 << 64) - 1
NORM_CHUNK = 1 << 20  # elements per float64 chunk of the squared distances of a candidate


def _splitmix64(x: int) -> int:
    """One SplitMix64 output step (Steele, Lea, Flood 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(*parts: int) -> int:
    """A 63-bit seed for a torch.Generator from integers (seed, update, micro-batch, k, tensor, ...).

    Different tuples give unrelated seeds, the same tuple always the same one: the random stream of a
    candidate depends only on where it is in training, so a resumed run and every data-parallel worker
    regenerate exactly the same candidates.
    """
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


# -- the MLE step and the noise scales ------------------------------------------------------------------
def clip_global_norm_(tensors: Sequence[torch.Tensor], max_norm: float) -> float:
    """Scales ``tensors`` in place to L2 norm at most ``max_norm`` (0: no clipping); returns the norm before.

    The norm is accumulated in float64 (Appendix A.4: "the MLE gradient is clipped to have a maximum L2
    norm of 1.0").
    """
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        for t in tensors:
            t.mul_(scale)
    return norm


def noise_scales(grads: Sequence[torch.Tensor], noise: float, scale: str) -> List[float]:
    """Per-tensor standard deviations sigma_p of the proposal (Appendix A.4).

    Args:
        grads: the (clipped) MLE gradient, one tensor per parameter tensor.
        noise: the noise level (--mgs-noise); 0 makes every candidate a point (0 or the MLE step).
        scale: "tensor": sigma_p = noise * mean |g_p|; "global": sigma = noise * mean |g| over all
            parameters; "constant": sigma = noise.
    Returns:
        one float per tensor.
    """
    if scale == "constant":
        return [float(noise)] * len(grads)
    if scale == "global":
        total = sum(float(g.abs().sum(dtype=torch.float64)) for g in grads)
        count = sum(g.numel() for g in grads)
        return [float(noise) * total / max(count, 1)] * len(grads)
    if scale == "tensor":
        return [float(noise) * float(g.abs().mean(dtype=torch.float64)) if g.numel() else 0.0 for g in grads]
    raise ValueError(f"unknown noise scale {scale!r}; choose one of {list(NOISE_SCALE_CHOICES)}")


def assign_components(num_candidates: int, mix_prob: float, assignment: str, seed: int) -> List[bool]:
    """Which mixture component each candidate is drawn from: True = around the MLE step, False = around 0.

    "sample" (Algorithm 1): independently, the zero component with probability ``mix_prob`` (pi).
    "alternate" (the authors' code: with pi = 0.5, even candidates from the MLE component, odd ones from
    the zero component): candidate k is from the zero component when floor((k+1) pi) > floor(k pi),
    which spreads round(K pi) zero candidates evenly and gives all-zero / all-MLE at pi = 1 / 0.
    """
    if assignment == "sample":
        generator = torch.Generator().manual_seed(seed)
        draws = torch.rand(num_candidates, generator=generator, dtype=torch.float64)
        return [bool(u >= mix_prob) for u in draws]
    if assignment == "alternate":
        return [math.floor((k + 1) * mix_prob) == math.floor(k * mix_prob) for k in range(num_candidates)]
    raise ValueError(f"unknown component assignment {assignment!r}; choose one of {list(ASSIGNMENT_CHOICES)}")


# -- candidates, regenerated from seeds -------------------------------------------------------------------
def candidate_noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    """eps ~ N(0, I) shaped like ``like`` (float32, on its device), from a generator seeded with ``seed``."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def combine(center: torch.Tensor, coefficient: float, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """coefficient * center + sigma * noise: a candidate (coefficient 0 or 1) or a weighted sum of them."""
    return center * coefficient + noise * sigma


class CandidateSampler:
    """Regenerates the candidates Delta_k of one update, tensor by tensor, never storing them.

    Delta_k,p = [from_mle_k] m_p + sigma_p eps_k,p with eps_k,p drawn from ``stream_seed(*seed_parts, k, p)``.

    Args:
        mle_step: m, the descent step -clip(grad L_MLE), one float32 tensor per parameter tensor.
        sigmas: sigma_p per tensor (:func:`noise_scales`).
        from_mle: K flags (:func:`assign_components`).
        seed_parts: integers naming this update, e.g. (seed, update, micro-batch).
    """

    def __init__(self, mle_step: Sequence[torch.Tensor], sigmas: Sequence[float], from_mle: Sequence[bool],
                 seed_parts: Sequence[int]):  # fmt: skip
        if len(mle_step) != len(sigmas):
            raise ValueError(f"{len(mle_step)} MLE-step tensors but {len(sigmas)} noise scales")
        self.mle_step = list(mle_step)
        self.sigmas = [float(s) for s in sigmas]
        self.from_mle = [bool(c) for c in from_mle]
        self.seed_parts = tuple(int(p) for p in seed_parts)

    @property
    def num_candidates(self) -> int:
        return len(self.from_mle)

    def noise(self, k: int, p: int) -> torch.Tensor:
        """eps_k,p: the same tensor however often and in whatever order it is asked for."""
        return candidate_noise(self.mle_step[p], stream_seed(*self.seed_parts, k, p))

    def tensor(self, k: int, p: int) -> torch.Tensor:
        """Delta_k,p (float32)."""
        sigma = self.sigmas[p]
        noise = self.noise(k, p) if sigma != 0.0 else torch.zeros_like(self.mle_step[p])
        return combine(self.mle_step[p], 1.0 if self.from_mle[k] else 0.0, sigma, noise)

    def tensors(self, k: int) -> Iterable[torch.Tensor]:
        for p in range(len(self.mle_step)):
            yield self.tensor(k, p)

    def direction(self, weights: Sequence[float]) -> List[torch.Tensor]:
        """Delta_MGS = sum_k w_k Delta_k (eq. 3), as (sum_k w_k [from_mle_k]) m_p + sigma_p sum_k w_k eps_k,p.

        The MLE part's coefficient is summed in float64 first, so that candidates which are all the MLE step
        (pi = 0, no noise) give that step exactly whatever K.
        """
        if len(weights) != self.num_candidates:
            raise ValueError(f"{len(weights)} weights for {self.num_candidates} candidates")
        mle_weight = math.fsum(float(w) for w, c in zip(weights, self.from_mle) if c)
        out = []
        for p, center in enumerate(self.mle_step):
            noise_sum = torch.zeros_like(center)
            if self.sigmas[p] != 0.0:
                for k, w in enumerate(weights):
                    if w != 0.0:
                        noise_sum.add_(self.noise(k, p), alpha=float(w))
            out.append(combine(center, mle_weight, self.sigmas[p], noise_sum))
        return out


# -- the proposal density (eq. 4) -----------------------------------------------------------------------------
@dataclass
class CandidateNorms:
    """Squared distances of one candidate to the two component means, summed over tensors (float64).

    scaled_*: sum_p |Delta_p - mean_p|^2 / sigma_p^2 (eq. 4 with the real sigmas; a tensor with sigma_p = 0
    contributes 0 when Delta_p equals the mean and +inf otherwise, the limit of a vanishing variance);
    plain_*: sum_p |Delta_p - mean_p|^2 (unit variances, as the authors' code).
    """

    scaled_zero: float = 0.0
    scaled_mle: float = 0.0
    plain_zero: float = 0.0
    plain_mle: float = 0.0

    def add(self, delta: torch.Tensor, mle_step: torch.Tensor, sigma: float):
        zero_sq = mle_sq = 0.0
        # float64 (float32 differences lose ~1e-8 relative), in chunks: a transient of NORM_CHUNK doubles at most
        for d, m in zip(delta.reshape(-1).split(NORM_CHUNK), mle_step.reshape(-1).split(NORM_CHUNK)):
            d64 = d.double()
            zero_sq += float(torch.dot(d64, d64))
            d64.sub_(m.double())
            mle_sq += float(torch.dot(d64, d64))
        self.plain_zero += zero_sq
        self.plain_mle += mle_sq
        if sigma > 0.0:
            self.scaled_zero += zero_sq / sigma**2
            self.scaled_mle += mle_sq / sigma**2
        else:
            self.scaled_zero += 0.0 if zero_sq == 0.0 else math.inf
            self.scaled_mle += 0.0 if mle_sq == 0.0 else math.inf


def mixture_log_density(sq_zero: torch.Tensor, sq_mle: torch.Tensor, mix_prob: float,
                        log_normalizer: float = 0.0) -> torch.Tensor:  # fmt: skip
    """log [pi exp(-sq_zero / 2) + (1 - pi) exp(-sq_mle / 2)] + log_normalizer, in log space (eq. 4).

    Args:
        sq_zero, sq_mle: K (float64) squared Mahalanobis distances of each candidate to the two means.
        mix_prob: pi, the weight of the zero-mean component.
        log_normalizer: the Gaussian's log normalising constant (:func:`gaussian_log_normalizer`); it is
            the same for every candidate and cancels in the weights.
    Returns:
        K log-densities (float64).
    """
    with torch.no_grad():
        log_pi = math.log(mix_prob) if mix_prob > 0 else -math.inf
        log_rest = math.log1p(-mix_prob) if mix_prob < 1 else -math.inf
        terms = torch.stack([log_pi - 0.5 * sq_zero.double(), log_rest - 0.5 * sq_mle.double()])  # 2 x K
        return torch.logsumexp(terms, dim=0) + log_normalizer  # K


def gaussian_log_normalizer(sizes: Sequence[int], sigmas: Sequence[float]) -> float:
    """log of N(x | mean, diag sigma^2)'s constant: -sum_p n_p (log sigma_p + log(2 pi) / 2), over sigma_p > 0."""
    return -math.fsum(n * (math.log(s) + 0.5 * math.log(2 * math.pi)) for n, s in zip(sizes, sigmas) if s > 0)


def proposal_log_density(norms: Sequence[CandidateNorms], mix_prob: float, density: str) -> torch.Tensor:
    """K values log q(Delta_k) up to a constant shared by all candidates ("exact", "unit", or "none": 0)."""
    if density == "none":
        return torch.zeros(len(norms), dtype=torch.float64)
    if density == "exact":
        zero, mle = [n.scaled_zero for n in norms], [n.scaled_mle for n in norms]
    elif density == "unit":
        zero, mle = [n.plain_zero for n in norms], [n.plain_mle for n in norms]
    else:
        raise ValueError(f"unknown proposal density {density!r}; choose one of {list(DENSITY_CHOICES)}")
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return mixture_log_density(as_tensor(zero), as_tensor(mle), mix_prob)


# -- the importance weights (eq. 3, 9) -------------------------------------------------------------------------
def log_importance_weights(current_cost: float, candidate_costs: torch.Tensor, log_proposal: torch.Tensor,
                           alpha: float) -> torch.Tensor:  # fmt: skip
    """Normalised log-weights log w_k - log sum_k' w_k' (Algorithm 1; eq. 3 and Appendix A.1, eq. 9).

    log w_k = alpha (C(theta) - C(theta + Delta_k)) - log q(Delta_k).  C(theta) is the same for every
    candidate and cancels in the normalisation; it is kept for fidelity to the paper's form.

    Args:
        current_cost: C(theta), the pooled task loss of the current parameters.
        candidate_costs: K pooled task losses C(theta + Delta_k).
        log_proposal: K values log q(Delta_k) (:func:`proposal_log_density`).
        alpha: the temperature (> 0 sharpens the weights towards the best candidate; 0: only 1/q).
    Returns:
        K normalised log-weights (float64), computed in log space (no overflow for large alpha).
    """
    costs = candidate_costs.double()
    log_w = alpha * (float(current_cost) - costs) - log_proposal.double()  # K
    return torch.log_softmax(log_w, dim=0)


def importance_weights(current_cost: float, candidate_costs: torch.Tensor, log_proposal: torch.Tensor,
                       alpha: float) -> torch.Tensor:  # fmt: skip
    """K normalised weights (float64) summing to 1: the softmax of the log-weights of
    :func:`log_importance_weights` (exactly 1/K each when all candidates tie)."""
    costs = candidate_costs.double()
    return torch.softmax(alpha * (float(current_cost) - costs) - log_proposal.double(), dim=0)


# -- perturbing the parameters in place and restoring them exactly -----------------------------------------------
class ParameterSnapshot:
    """One saved copy of the parameters (1x their size), restored bit for bit with ``copy_``."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        with torch.no_grad():
            self.saved = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self):
        for p, s in zip(self.params, self.saved):
            p.copy_(s)

    def release(self):
        self.saved = []


@torch.no_grad()
def apply_candidate_(params: Sequence[torch.Tensor], sampler: CandidateSampler, k: int) -> CandidateNorms:
    """theta <- theta + Delta_k in place, one tensor at a time; returns Delta_k's :class:`CandidateNorms`."""
    norms = CandidateNorms()
    for p, (param, delta) in enumerate(zip(params, sampler.tensors(k))):
        norms.add(delta, sampler.mle_step[p], sampler.sigmas[p])
        param.add_(delta.to(param.dtype))
    return norms


def weight_statistics(weights: torch.Tensor, from_mle: Sequence[bool]):
    """(std of the K normalised weights (Figure 2), their total on MLE-component candidates (Figure 3),
    1.0 when the largest weight is an MLE-component candidate's else 0.0)."""
    w = weights.double()
    std = float(w.std(unbiased=False)) if w.numel() > 1 else 0.0
    mle = math.fsum(float(x) for x, c in zip(w, from_mle) if c)
    return std, mle, 1.0 if from_mle[int(w.argmax())] else 0.0
