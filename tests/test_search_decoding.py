"""Decoding options of search-aware models (Goyal, Characterizing and Overcoming the Limitations of
Neural Autoregressive Models, PhD thesis, sections 4.3.4 and 5.2): beam search over raw scores, soft
beam search decoding, their wiring into --task tagging and --task search_aware_translation, and the
errors for impossible flag combinations.

The references are slow loops written from the algorithms: fairseq's beam search (sequence_generator.py,
with its finalisation of EOS candidates) over any local score function, and the thesis's Algorithm 1
with finished hypotheses absorbing (the semantics soft beam search relaxes)."""
import math
import re
from argparse import Namespace

import pytest
import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder
from fairseq.sequence_generator import SequenceGenerator

from fairseq_ext.generators.raw_score_generator import RawScoreModel, RawScoreSequenceGenerator, raw_score_models
from fairseq_ext.generators.search_options import SearchDecodingConfig, check_search_options
from fairseq_ext.generators.soft_beam_generator import SoftBeamGenerator
from fairseq_ext.generators.tagging_generator import TaggingSequenceGenerator, label_mask
from fairseq_ext.tasks.search_aware_translation import SearchAwareTranslationConfig, SearchAwareTranslationTask
from fairseq_ext.testing import cli, synthetic_tagging, tiny


# -- slow references ------------------------------------------------------------------------------
def slow_fairseq_beam_search(local_scores, beam, max_len, pad, eos, min_len=1):
    """fairseq's SequenceGenerator beam search as a slow loop, over ``local_scores(prefix) -> V floats``.

    Step t expands the live hypotheses (only the first at step 0) with every token but pad (EOS
    banned before ``min_len``, only EOS at ``max_len``), keeps the 2k best candidates, finalises the
    EOS candidates among the first k (while the sentence has fewer than k), and continues with the
    first k non-EOS ones; it stops once k hypotheses are final.  Scores are divided by the length
    (EOS included).  Returns [(tokens, score, positional scores)], best first.
    """
    live, final = [((), 0.0, ())], []
    for step in range(max_len + 1):
        candidates = []
        for prefix, score, positional in live:
            scores = local_scores(prefix)
            for w, f in enumerate(scores):
                if w == pad or (step < min_len and w == eos) or (step == max_len and w != eos):
                    continue
                candidates.append((prefix + (w,), score + f, positional + (f,)))
        candidates = sorted(candidates, key=lambda c: -c[1])[: 2 * beam]
        for tokens, score, positional in candidates[:beam]:
            if tokens[-1] == eos and len(final) < beam:
                final.append((list(tokens), score / len(tokens), list(positional)))
        if len(final) >= beam:
            break
        live = [c for c in candidates if c[0][-1] != eos][:beam]
    return sorted(final, key=lambda h: -h[1])


def slow_absorbing_beam_search(local_scores, beam, steps, allowed, eos, fixed_length=False):
    """Thesis Algorithm 1 for ``steps`` steps, finished hypotheses absorbing (an element whose last token is
    EOS extends only with EOS at score 0), only the first element expanded at step 0.  ``fixed_length``:
    EOS only at the last step.  Unfinished elements get EOS appended (score 0).  Also returns the
    smallest gap between consecutive candidates among the k+1 best at any step (how hard the choices are).
    Returns ([(tokens, length-normalised score, positional scores)], best first; min gap)."""
    beam_elements, min_gap = [((), 0.0, ())], math.inf
    for t in range(steps):
        candidates = []
        for prefix, score, positional in beam_elements:
            if prefix and prefix[-1] == eos:
                candidates.append((prefix + (eos,), score, positional + (0.0,)))
                continue
            scores = local_scores(prefix)
            for w in allowed:
                if fixed_length and (w == eos) != (t == steps - 1):
                    continue
                candidates.append((prefix + (w,), score + scores[w], positional + (scores[w],)))
        candidates.sort(key=lambda c: -c[1])
        top = [c[1] for c in candidates[: beam + 1]]
        min_gap = min([min_gap] + [a - b for a, b in zip(top, top[1:])])
        beam_elements = candidates[:beam]
        if all(c[0][-1] == eos for c in beam_elements):
            break
    hypos = []
    for tokens, score, positional in beam_elements:
        tokens, positional = list(tokens), list(positional)
        if eos in tokens:
            n = tokens.index(eos) + 1
            tokens, positional = tokens[:n], positional[:n]
        else:
            tokens, positional = tokens + [eos], positional + [0.0]
        hypos.append((tokens, score / len(tokens), positional))
    return sorted(hypos, key=lambda h: -h[1]), min_gap


def teacher_forced_scores(model, sample, b, raw=False):
    """local_scores(prefix) of sentence b of ``sample`` by a full (non-incremental) forward pass."""
    src = sample["net_input"]["src_tokens"][b : b + 1]
    lengths = sample["net_input"]["src_lengths"][b : b + 1]
    eos = model.decoder.dictionary.eos()
    cache = {}

    def scores(prefix):
        if prefix not in cache:
            prev = torch.tensor([[eos, *prefix]])
            with torch.no_grad():
                out = model(src, lengths, prev)
                logits = out[0][0, -1].double()
                cache[prefix] = (logits if raw else torch.log_softmax(logits, -1)).tolist()
        return cache[prefix]

    return scores


def as_lists(hypos):
    return [(h["tokens"].tolist(), float(h["score"]), h["positional_scores"].tolist()) for h in hypos]


FLOAT32_EPS = torch.finfo(torch.float32).eps
# "a few" float32 epsilons per operation (see float32_tolerance): the worst case measured on the
# batch-independence tests below is 2.1 eps T M, so 16 leaves a margin of 8
FLOAT32_ROUNDING_FACTOR = 16


def float32_tolerance(positional):
    """Absolute tolerance for comparing two float32 decodings of one hypothesis computed in differently
    shaped batches (other matrix shapes, other summation orders, other rounding).

    Each of the T decoding steps feeds its (soft-mixed) decoder states and running scores into the next,
    so rounding differences grow at most about linearly with T, relative to the magnitude of the
    accumulated scores M = max(1, max_t |s_t|), s_t the running sum of positional scores:
    tol = FLOAT32_ROUNDING_FACTOR * eps * T * M.  Here T <= 7 and M <= 25, so tol <= 3.4e-4: three orders
    of magnitude below what a scoring bug moves (a length term or one token's score, >= 1e-1)."""
    cumulative = torch.tensor(positional, dtype=torch.float64).cumsum(0)
    magnitude = max(1.0, cumulative.abs().max().item())
    return FLOAT32_ROUNDING_FACTOR * FLOAT32_EPS * len(positional) * magnitude


def assert_same_hypotheses(got, expected, atol=1e-4):
    """Same tokens, and scores within ``atol`` (a number, or ``float32_tolerance`` for float32 rounding)."""
    assert [h[0] for h in got] == [h[0] for h in expected]
    for (_, score, positional), (_, ref_score, ref_positional) in zip(got, expected):
        tol = atol(ref_positional) if callable(atol) else atol
        assert score == pytest.approx(ref_score, abs=tol)
        assert positional == pytest.approx(ref_positional, abs=tol)


# -- a model with hand-set scores -------------------------------------------------------------------
class NullEncoder(FairseqEncoder):
    def forward(self, src_tokens, src_lengths=None, **kwargs):
        return {"encoder_out": [src_tokens.new_zeros(src_tokens.size(1), src_tokens.size(0), 1, dtype=torch.float)]}

    def reorder_encoder_out(self, encoder_out, new_order):
        return {"encoder_out": [encoder_out["encoder_out"][0].index_select(1, new_order)]}


class TableDecoder(FairseqIncrementalDecoder):
    """Raw scores (logits) of the next token looked up by the prefix generated so far (default: EOS)."""

    def __init__(self, dictionary, table):
        super().__init__(dictionary)
        self.table = table

    def row(self, prefix):
        symbols = tuple(self.dictionary[t] for t in prefix)
        logits = torch.full((len(self.dictionary),), -40.0)
        for i in range(len(self.dictionary)):
            logits[i] -= i  # no ties among the tokens nobody uses
        for symbol, value in self.table.get(symbols, {"</s>": 0.0}).items():
            logits[self.dictionary.index(symbol)] = value
        return logits

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        rows = [
            torch.stack([self.row(tuple(r[1 : t + 1].tolist())) for t in range(r.numel())]) for r in prev_output_tokens
        ]
        return torch.stack(rows), {"attn": [None]}  # B x T x V

    def reorder_incremental_state(self, incremental_state, new_order):
        pass  # stateless


def table_model():
    """Raw scores built so that raw and normalised search disagree:

    step 0:        a 5,  b 4,  c 0.3             log-softmax: a -0.32, b -1.32, c -5.0
    after a:       </s> 1,  c 0.5,  d 0.2         log-softmax: </s> -0.72, c -1.22, d -1.52
    after b:       </s> 10 (else ~ -40)           log-softmax: </s> ~ 0
    anything else: </s> 0 (else ~ -40)
    raw: "b </s>" (14 / 2) beats "a </s>" (6 / 2); normalised: "a </s>" (-1.04 / 2) beats "b </s>" (-1.32 / 2).
    """
    d = Dictionary()
    for symbol in "abcd":
        d.add_symbol(symbol)
    table = {(): {"a": 5.0, "b": 4.0, "c": 0.3}, ("a",): {"</s>": 1.0, "c": 0.5, "d": 0.2}, ("b",): {"</s>": 10.0}}
    model = FairseqEncoderDecoderModel(NullEncoder(d), TableDecoder(d, table)).eval()
    net_input = {"src_tokens": torch.tensor([[4, d.eos()]]), "src_lengths": torch.tensor([2])}
    sample = {"id": torch.tensor([0]), "net_input": net_input}
    return d, model, sample


def test_raw_score_beam_search_matches_a_slow_raw_beam_search_and_differs_from_the_normalized_one():
    d, model, sample = table_model()
    lengths = {"beam_size": 2, "max_len_a": 0, "max_len_b": 3}
    raw = as_lists(RawScoreSequenceGenerator([model], d, **lengths).generate([model], sample)[0])
    normalized = as_lists(SequenceGenerator([model], d, **lengths).generate([model], sample)[0])
    raw_scores = teacher_forced_scores(model, sample, 0, raw=True)
    log_probs = teacher_forced_scores(model, sample, 0)
    assert_same_hypotheses(raw, slow_fairseq_beam_search(raw_scores, 2, 3, d.pad(), d.eos()))
    assert_same_hypotheses(normalized, slow_fairseq_beam_search(log_probs, 2, 3, d.pad(), d.eos()))
    assert d.string(torch.tensor(raw[0][0])) == "b" and raw[0][1] == pytest.approx(7.0)
    assert d.string(torch.tensor(normalized[0][0])) == "a" and normalized[0][1] == pytest.approx(-0.52, abs=0.01)


def tiny_transformer(seed=1, scale=1.0):
    torch.manual_seed(seed)
    task, model, _ = tiny.build("transformer", ["--criterion", "cross_entropy"], num_symbols=6)
    with torch.no_grad():
        model.decoder.output_projection.weight.mul_(scale)  # spread the scores (harder soft choices)
    return task, model.eval()


PAIRS = [([1, 2, 3], [3, 2, 1]), ([4, 5], [5, 4]), ([0], [0]), ([5, 1, 1, 2], [2, 1, 1, 5])]


def test_search_scores_raw_through_the_task_is_the_slow_raw_beam_search_on_a_tiny_transformer():
    task, model = tiny_transformer()
    sample = tiny.translation_batch(task, PAIRS, given_order=True)
    cfg = SearchAwareTranslationConfig(search_scores="raw")
    raw_task = SearchAwareTranslationTask(cfg, task.src_dict, task.tgt_dict)
    generator = raw_task.build_generator([model], Namespace(beam=3, max_len_a=0, max_len_b=4))
    assert isinstance(generator.model.single_model, RawScoreModel)
    pad, eos = task.tgt_dict.pad(), task.tgt_dict.eos()
    for b, hypos in enumerate(generator.generate([model], sample)):
        expected = slow_fairseq_beam_search(teacher_forced_scores(model, sample, b, raw=True), 3, 4, pad, eos)
        assert_same_hypotheses(as_lists(hypos), expected)


def test_raw_scores_refuse_ensembles_and_adaptive_softmax():
    _, model = tiny_transformer()
    with pytest.raises(ValueError, match="ensemble of 2 models"):
        raw_score_models([model, model])
    model.decoder.adaptive_softmax = torch.nn.Identity()
    with pytest.raises(ValueError, match="adaptive softmax"):
        raw_score_models([model])


@pytest.mark.parametrize("normalization", ["local", "global"])
def test_soft_beam_decoding_with_a_large_alpha_is_hard_beam_search_with_absorbing_ends(normalization):
    task, model = tiny_transformer(seed=2, scale=10.0)
    sample = tiny.translation_batch(task, PAIRS, given_order=True)
    generator = SoftBeamGenerator([model], task.tgt_dict, beam_size=3, alpha=1e4, normalization=normalization,
                                  max_len_a=0, max_len_b=4)  # fmt: skip
    d = task.tgt_dict
    allowed = [w for w in range(len(d)) if w not in (d.pad(), d.bos())]
    for b, hypos in enumerate(generator.generate([model], sample)):
        scores = teacher_forced_scores(model, sample, b, raw=normalization == "global")
        expected, min_gap = slow_absorbing_beam_search(scores, 3, 4, allowed, d.eos())
        assert min_gap > 0.1, "choices too close for alpha 1e4 to be hard: change the seed"
        assert_same_hypotheses(as_lists(hypos), expected, atol=1e-3)


def test_soft_beam_decoding_with_a_small_alpha_differs_from_hard_beam_search():
    task, model = tiny_transformer(seed=2, scale=10.0)
    sample = tiny.translation_batch(task, PAIRS, given_order=True)
    hard = SoftBeamGenerator([model], task.tgt_dict, beam_size=3, alpha=1e4, max_len_a=0, max_len_b=4)
    soft = SoftBeamGenerator([model], task.tgt_dict, beam_size=3, alpha=0.5, max_len_a=0, max_len_b=4)
    hard_out = [as_lists(h) for h in hard.generate([model], sample)]
    soft_out = [as_lists(h) for h in soft.generate([model], sample)]
    token_differences = [b for b in range(len(PAIRS)) if [h[0] for h in hard_out[b]] != [h[0] for h in soft_out[b]]]
    assert token_differences, (hard_out, soft_out)
    eos = task.tgt_dict.eos()
    for hypos in soft_out:  # still well-formed: one EOS, at the end
        assert all(tokens[-1] == eos and tokens.count(eos) == 1 for tokens, _, _ in hypos)


def test_soft_beam_decoding_does_not_depend_on_the_batch_with_a_large_alpha():
    task, model = tiny_transformer(seed=2, scale=10.0)
    generator = SoftBeamGenerator([model], task.tgt_dict, beam_size=3, alpha=1e4, max_len_a=1, max_len_b=1)
    together = generator.generate([model], tiny.translation_batch(task, PAIRS, given_order=True))
    for pair, hypos in zip(PAIRS, together):  # left padding, per-sentence horizons
        alone = generator.generate([model], tiny.translation_batch(task, [pair]))[0]
        assert_same_hypotheses(as_lists(hypos), as_lists(alone), atol=float32_tolerance)


def test_soft_beam_decoding_does_not_depend_on_the_batch_with_a_small_alpha():
    task, model = tiny_transformer(seed=2, scale=10.0)
    generator = SoftBeamGenerator([model], task.tgt_dict, beam_size=3, alpha=0.5, max_len_a=0, max_len_b=4)
    together = generator.generate([model], tiny.translation_batch(task, PAIRS, given_order=True))
    for pair, hypos in zip(PAIRS, together):
        alone = generator.generate([model], tiny.translation_batch(task, [pair]))[0]
        assert_same_hypotheses(as_lists(hypos), as_lists(alone), atol=float32_tolerance)


def tiny_tagger(scale=1.0, seed=3):
    task, model, _ = synthetic_tagging.build_tagger(seed=seed)
    with torch.no_grad():
        model.decoder.fc_out.weight.mul_(scale)
        model.decoder.fc_out.bias.mul_(scale)
    return task, model.eval()


TAGGING = [(["w1", "w2", "w3"], ["O", "O", "O"]), (["w4"], ["O"]), (["w5", "w6", "w7", "w0", "w1"], ["O"] * 5)]


def test_soft_beam_tagging_with_a_large_alpha_is_the_tagging_beam_search_one_label_per_word():
    task, model = tiny_tagger(scale=100.0)  # spread scores: every choice clear at alpha 1e4 (checked below)
    sample = synthetic_tagging.tagging_batch(task, TAGGING, given_order=True)
    soft = SoftBeamGenerator([model], task.tgt_dict, beam_size=3, alpha=1e4, fixed_length=True)
    hard = TaggingSequenceGenerator([model], task.tgt_dict, beam_size=3)
    labels = sorted(label_mask(task.tgt_dict).nonzero().flatten().tolist())
    eos = task.tgt_dict.eos()
    outputs = zip(TAGGING, soft.generate([model], sample), hard.generate([model], sample))
    for b, ((words, _), soft_hypos, hard_hypos) in enumerate(outputs):
        expected, min_gap = slow_absorbing_beam_search(
            teacher_forced_scores(model, sample, b), 3, len(words) + 1, labels + [eos], eos, fixed_length=True
        )
        assert min_gap > 0.1, "choices too close for alpha 1e4 to be hard: change the seed"
        assert_same_hypotheses(as_lists(soft_hypos), expected, atol=1e-3)
        # fixed length: fairseq's beam search under the tagging mask is Algorithm 1 too
        assert_same_hypotheses(as_lists(hard_hypos), expected, atol=1e-3)
        for tokens, _, _ in as_lists(soft_hypos):
            assert len(tokens) == len(words) + 1 and tokens[-1] == eos and set(tokens[:-1]) <= set(labels)


def test_raw_score_tagging_keeps_one_label_per_word_and_scores_with_raw_logits():
    task, model = tiny_tagger()
    tagging_task = task
    tagging_task.cfg.search_scores = "raw"
    try:
        generator = tagging_task.build_generator([model], Namespace(beam=2))
    finally:
        tagging_task.cfg.search_scores = "normalized"
    sample = synthetic_tagging.tagging_batch(task, TAGGING, given_order=True)
    labels = set(label_mask(task.tgt_dict).nonzero().flatten().tolist())
    for b, ((words, _), hypos) in enumerate(zip(TAGGING, generator.generate([model], sample))):
        raw = teacher_forced_scores(model, sample, b, raw=True)
        for tokens, _, positional in as_lists(hypos):
            assert len(tokens) == len(words) + 1 and set(tokens[:-1]) <= labels
            expected = [raw(tuple(tokens[:t]))[w] for t, w in enumerate(tokens)]
            assert positional == pytest.approx(expected, abs=1e-4)
            log_probs = teacher_forced_scores(model, sample, b)
            normalized = [log_probs(tuple(tokens[:t]))[w] for t, w in enumerate(tokens)]
            assert positional != pytest.approx(normalized, abs=1e-2)


def test_eval_tagging_decodes_validation_with_the_search_options():
    task, model, criterion = synthetic_tagging.build_tagger(
        flags=["--eval-tagging", "--soft-beam-decoding", "--soft-beam-decoding-alpha", "1e4"]
    )
    assert isinstance(task.tagging_generator, SoftBeamGenerator) and task.tagging_generator.beam_size == 1
    model.eval()
    _, _, log = task.valid_step(synthetic_tagging.tagging_batch(task, TAGGING), model, criterion)
    assert log["_tagging_tokens"] == sum(len(words) for words, _ in TAGGING)


# -- flags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, generation, flag",
    [
        ({"soft_beam_decoding": True}, {"sampling": True}, "--sampling"),
        ({"soft_beam_decoding": True}, {"diverse_beam_groups": 2}, "--diverse-beam-groups"),
        ({"soft_beam_decoding": True}, {"prefix_size": 1}, "--prefix-size"),
        ({"soft_beam_decoding": True}, {"match_source_len": True}, "--match-source-len"),
        ({"soft_beam_decoding": True}, {"temperature": 0.5}, "--temperature"),
        ({"soft_beam_decoding": True}, {"beam": 2, "nbest": 3}, "--nbest"),
        ({"soft_beam_decoding": True, "soft_beam_decoding_alpha": 0.0}, {}, "--soft-beam-decoding-alpha"),
        ({"soft_beam_decoding": True}, {"score_reference": True}, "--score-reference"),
        ({"search_scores": "raw"}, {"sampling": True}, "--sampling"),
        ({"search_scores": "raw"}, {"score_reference": True}, "--score-reference"),
    ],
)
def test_impossible_flag_combinations_name_the_flag(options, generation, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        check_search_options(SearchDecodingConfig(**options), Namespace(**generation))


def test_the_tasks_check_the_flags_before_building_a_generator():
    task, model = tiny_transformer()
    cfg = SearchAwareTranslationConfig(soft_beam_decoding=True)
    soft = SearchAwareTranslationTask(cfg, task.src_dict, task.tgt_dict)
    with pytest.raises(ValueError, match="ensemble of 2 models"):
        soft.build_generator([model, model], Namespace(beam=2))
    with pytest.raises(ValueError, match="--lm-path"):
        soft.build_generator([model], Namespace(beam=2), extra_gen_cls_kwargs={"lm_model": model})
    tagging_task, tagger = tiny_tagger()
    tagging_task.cfg.soft_beam_decoding = True
    try:
        with pytest.raises(ValueError, match="--nbest"):
            tagging_task.build_generator([tagger], Namespace(beam=2, nbest=3))
        assert isinstance(tagging_task.build_generator([tagger], Namespace(beam=2, nbest=2)), SoftBeamGenerator)
    finally:
        tagging_task.cfg.soft_beam_decoding = False
    # neutral options: exactly fairseq's generators
    plain = SearchAwareTranslationTask(SearchAwareTranslationConfig(), task.src_dict, task.tgt_dict)
    assert type(plain.build_generator([model], Namespace(beam=2))) is SequenceGenerator


# -- end to end through the CLI ----------------------------------------------------------------------
# The models are the session's shared training runs (conftest.py): any trained translation model and
# tagger serve these decoding checks, so none is trained here.
@pytest.fixture(scope="module")
def trained_transformer(reverse_checkpoints):
    return reverse_checkpoints["eval_bleu"].checkpoint


@pytest.fixture(scope="module")
def trained_tagger(tagging_run):
    return tagging_run.data_bin, tagging_run.checkpoint


def load_for_generation(data_bin, checkpoint, flags):
    args = options.parse_args_and_arch(
        options.get_generation_parser(), [data_bin, "--user-dir", cli.USER_DIR, "--path", checkpoint, "--cpu", *flags]
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([checkpoint], task=task)
    return task, [m.eval() for m in models], cfg


@pytest.mark.slow
def test_search_scores_normalized_reproduces_fairseqs_generator_exactly(reverse_data_bin, trained_transformer):
    outputs = []
    for flags in (["--task", "translation"], ["--task", "search_aware_translation", "--search-scores", "normalized"]):
        task, models, cfg = load_for_generation(reverse_data_bin, trained_transformer, [*flags, "--beam", "3"])
        task.load_dataset("test")
        dataset = task.dataset("test")
        sample = dataset.collater([dataset[i] for i in range(len(dataset))])
        outputs.append(task.build_generator(models, cfg.generation).generate(models, sample))
    fairseq_out, ours = outputs
    for theirs, mine in zip(fairseq_out, ours):
        assert len(theirs) == len(mine) == 3
        for a, b in zip(theirs, mine):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["score"], b["score"])
            assert torch.equal(a["positional_scores"], b["positional_scores"])


@pytest.mark.slow
def test_generate_with_soft_beam_and_raw_scores_gives_every_sentence_one_hypothesis(
    reverse_data_bin, trained_transformer, trained_tagger
):
    tagging_bin, tagger = trained_tagger
    tags = set(synthetic_tagging.NER_TAGS)
    for flags in (["--beam", "3", "--soft-beam-decoding"], ["--beam", "2", "--search-scores", "raw"]):
        out = cli.generate(tagging_bin, tagger, ["--task", "tagging", *flags])  # checks one hypothesis each
        sources = {int(m.group(1)): m.group(2) for m in re.finditer(r"^S-(\d+)\t(.*)$", out, re.M)}
        hyps = cli.hypotheses(out)
        assert len(hyps) == len(sources) == cli.count_lines(tagging_bin, "test") > 0
        for i, hyp in hyps.items():
            assert len(hyp.split()) == len(sources[i].split()) and set(hyp.split()) <= tags, (sources[i], hyp)
    for flags in (["--beam", "3", "--soft-beam-decoding"], ["--beam", "3", "--search-scores", "raw"]):
        out = cli.generate(reverse_data_bin, trained_transformer, ["--task", "search_aware_translation", *flags])
        assert len(cli.hypotheses(out)) == cli.count_lines(reverse_data_bin, "test") > 0


@pytest.mark.slow
def test_generate_rejects_a_bad_combination_before_decoding(trained_tagger):
    tagging_bin, tagger = trained_tagger
    out = cli.run_cli("fairseq-generate", [
        tagging_bin, "--path", tagger, "--cpu", "--task", "tagging", "--gen-subset", "test",
        "--soft-beam-decoding", "--beam", "2", "--nbest", "3",
    ], check=False)  # fmt: skip
    assert "--nbest (3) > --beam (2)" in out and not re.search(r"^H-\d", out, re.M), out[-2000:]
