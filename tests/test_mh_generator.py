"""The MH / degenerate Gibbs generator of --task translation_mh (Goyal's thesis "Characterizing and
Overcoming the Limitations of Neural Autoregressive Models", CMU 2021, chapter 6) on a tiny untrained
cmlm_transformer in-process -- hypotheses, output modes, statistics file, reproducibility under batch
order, padding and chunking, refused options -- and (slow) through fairseq-train / fairseq-generate."""
import json
import os
from argparse import Namespace

import pytest
import torch
from fairseq import options, tasks

from fairseq_ext.generators.mh_generator import MHGenerationConfig, MHGenerator, top_lengths, validate_mh_config
from fairseq_ext.testing import cli, tiny

STATS_KEYS = ["epoch", "phase", "chains", "acceptance_rate", "novel_rate", "energy_local", "energy_raw",
              "target_temperature", "block_size"]  # fmt: skip
SOURCES = [[1, 2, 3, 4, 5, 6, 7], [4, 4], [2, 5, 7, 1], [6, 3, 3, 3, 1, 0]]  # symbols w0 .. w7


def mh_cfg(**overrides):
    cfg = {k: v.default for k, v in MHGenerationConfig.__dataclass_fields__.items()}
    cfg.update(mh_chains=2, mh_burn_in_epochs=1, mh_sample_epochs=2)
    cfg.update(overrides)
    return Namespace(**cfg)


@pytest.fixture(scope="module")
def cmlm():
    with torch.random.fork_rng():
        torch.manual_seed(2)
        task, model, _ = tiny.build("cmlm_transformer", ["--criterion", "nat_loss"], num_symbols=8,
                                    extra=["--max-target-positions", "12"])  # fmt: skip
    model.eval()
    # an untrained length predictor's choice is arbitrary (often length 1): make it prefer the source length
    # (offset class 130 with --pred-length-offset: total length = source tokens + EOS + 2 = BOS + words + EOS),
    # then one shorter (129), so that the chains of a batch have various lengths >= 2
    model.decoder.pred_length_offset = True
    preferred = torch.full((256,), -20.0)
    preferred[130], preferred[129] = 0.0, -0.5

    def forward_length(normalize, encoder_out):
        b = encoder_out["encoder_out"][0].size(1)
        return torch.log_softmax(preferred, dim=0).expand(b, -1)

    model.decoder.forward_length = forward_length
    return task, model


def batch(task, indices):
    """A translation_lev-style batch of SOURCES[i] with dataset ids i, in the given order."""
    pairs = [(SOURCES[i], SOURCES[i]) for i in indices]
    sample = tiny.translation_batch(task, pairs, given_order=True)
    sample["id"] = torch.tensor(indices)
    return sample


def decode(task, model, indices, seed=1, **overrides):
    gen = MHGenerator([model], task.tgt_dict, mh_cfg(**overrides), seed=seed)
    return {i: h for i, h in zip(indices, gen.generate([model], batch(task, indices)))}, gen


def as_lists(hypos):
    return {i: [(h["tokens"].tolist(), round(float(h["score"]), 3)) for h in hs] for i, hs in hypos.items()}


@pytest.mark.parametrize("sampler", ["mh", "gibbs"])
def test_samples_do_not_depend_on_batch_order_padding_or_chunking(cmlm, sampler):
    task, model = cmlm
    opts = dict(mh_sampler=sampler, mh_length_beam=2, mh_output="samples")
    full, _ = decode(task, model, [0, 1, 2, 3], **opts)
    lengths = {len(h["tokens"]) for hs in full.values() for h in hs}
    assert len(lengths) > 2  # the chains of one batch have different lengths
    reordered, _ = decode(task, model, [3, 1, 0, 2], **opts)
    alone = {}
    for i in range(4):
        alone.update(decode(task, model, [i], **opts)[0])
    chunked, gen = decode(task, model, [2, 0, 3, 1], mh_max_tokens_per_pass=40, **opts)
    assert as_lists(reordered) == as_lists(full)
    assert as_lists(alone) == as_lists(full)
    assert as_lists(chunked) == as_lists(full)
    assert gen.counter.calls > 0 and gen.counter.rows > 0


def test_another_seed_gives_other_samples_and_the_same_seed_the_same(cmlm):
    task, model = cmlm
    cfg = mh_cfg(mh_output="samples", mh_sample_epochs=3)
    runs = [MHGenerator([model], task.tgt_dict, cfg, seed=s).generate([model], batch(task, [0, 2])) for s in (1, 1, 7)]
    as_tokens = [[[h["tokens"].tolist() for h in hs] for hs in run] for run in runs]
    assert as_tokens[0] == as_tokens[1] and as_tokens[0] != as_tokens[2]


@pytest.mark.parametrize("output", ["final", "best", "samples"])
def test_hypotheses_are_fairseq_dicts_in_the_promised_order(cmlm, output):
    task, model = cmlm
    hypos, gen = decode(task, model, [0, 1, 2], mh_output=output, mh_length_beam=2, mh_chains=3)
    eos = task.tgt_dict.eos()
    for hs in hypos.values():
        assert len(hs) == 2 * 3 * (2 if output == "samples" else 1)
        for h in hs:
            assert h["tokens"][-1] == eos and not bool((h["tokens"][:-1] == eos).any())
            assert not bool(torch.isin(h["tokens"][:-1], torch.tensor([0, 1, 3])).any())  # no bos, pad, mask
            assert h["positional_scores"].shape == h["tokens"].shape and float(h["positional_scores"][-1]) == 0
            assert float(h["score"]) == pytest.approx(float(h["positional_scores"].sum()), abs=1e-4)
            assert h["alignment"] is None
        scores = [float(h["score"]) for h in hs]
        if output != "samples":
            assert scores == sorted(scores, reverse=True)  # lowest energy first
        else:  # chain by chain: consecutive pairs of epochs share a chain (and so a length)
            assert all(len(hs[2 * k]["tokens"]) == len(hs[2 * k + 1]["tokens"]) for k in range(len(hs) // 2))


def test_best_is_never_worse_than_final(cmlm):
    task, model = cmlm
    final, _ = decode(task, model, [0, 2], mh_output="final", mh_energy="raw", mh_sample_epochs=4)
    best, _ = decode(task, model, [0, 2], mh_output="best", mh_energy="raw", mh_sample_epochs=4)
    for i in final:
        assert float(best[i][0]["score"]) >= float(final[i][0]["score"]) - 1e-5


def test_statistics_lines(cmlm, tmp_path):
    task, model = cmlm
    path = tmp_path / "stats.jsonl"
    path.write_text("stale line from an earlier run\n")
    cfg = mh_cfg(mh_stats_path=str(path), mh_block_size=2, mh_block_anneal=True, mh_burn_in_epochs=2,
                 mh_sample_epochs=2, mh_target_temperature_step=0.1, mh_forced_accept_epochs=1)  # fmt: skip
    gen = MHGenerator([model], task.tgt_dict, cfg, seed=1)
    assert path.read_text() == ""  # truncated when the generator is built
    gen.generate([model], batch(task, [0, 2]))
    gen.generate([model], batch(task, [3]))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2 * 5  # (warm start + 4 epochs) per batch
    for rec in lines:
        assert list(rec) == STATS_KEYS
    first = lines[:5]
    assert [r["epoch"] for r in first] == [0, 1, 2, 3, 4]
    assert [r["phase"] for r in first] == ["warm_start", "burn_in", "burn_in", "sample", "sample"]
    assert [r["chains"] for r in first] == [4] * 5 and lines[5]["chains"] == 2
    assert first[0]["acceptance_rate"] is None and first[0]["novel_rate"] is None
    assert first[1]["acceptance_rate"] == 1.0  # forced
    assert [r["block_size"] for r in first[1:]] == [2, 2, 1, 1]
    assert [r["target_temperature"] for r in first[1:]] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    for r in first[1:]:
        assert 0 <= r["novel_rate"] <= r["acceptance_rate"] <= 1
        assert isinstance(r["energy_local"], float) and isinstance(r["energy_raw"], float)


def test_top_lengths_follow_fairseqs_length_classes():
    lp = torch.full((2, 256), -10.0)
    lp[0, 7], lp[0, 9], lp[1, 128 + 3], lp[1, 128 - 5] = -0.1, -1.0, -0.2, -0.5
    plain = top_lengths(lp, torch.tensor([4, 6]), False, 2, 100)
    assert plain[0].tolist() == [5, 7]  # total length 7 = BOS + 5 + EOS
    offset = top_lengths(lp, torch.tensor([4, 6]), True, 2, 100)
    assert offset[1].tolist() == [6 + 3 - 2, 1]  # offset class 128 + d: source length + d; clamped to >= 1


# -- refused ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(mh_proposal_temperature=0.0), "--mh-proposal-temperature"),
        (dict(mh_target_temperature=-1.0), "--mh-target-temperature"),
        (dict(mh_top_p=0.0), "--mh-top-p"),
        (dict(mh_top_p=1.01), "--mh-top-p"),
        (dict(mh_target_temperature_step=0.1, mh_target_temperature_floor=0.0), "--mh-target-temperature-floor"),
        (dict(mh_chains=0), "--mh-chains"),
        (dict(mh_length_beam=0), "--mh-length-beam"),
        (dict(mh_output="samples", mh_sample_epochs=0), "--mh-output samples"),
        (dict(mh_max_tokens_per_pass=0), "--mh-max-tokens-per-pass"),
    ],
)
def test_refused_options_name_their_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        validate_mh_config(mh_cfg(**overrides))


def test_a_block_longer_than_any_target_is_refused_before_decoding(cmlm):
    task, model = cmlm
    with pytest.raises(ValueError, match=r"--mh-block-size 11 is larger than the longest target the model can decode \(10"):
        MHGenerator([model], task.tgt_dict, mh_cfg(mh_block_size=11), seed=1)  # lengths <= 12 - 2 = 10


def test_predicted_lengths_below_the_block_size_are_raised_to_it():
    length_log_probs = torch.full((2, 256), -30.0)
    length_log_probs[0, 3] = 0.0  # total length 3: one target token
    length_log_probs[1, 9] = 0.0  # total length 9: seven target tokens
    assert top_lengths(length_log_probs, None, False, 1, 100).tolist() == [[1], [7]]
    assert top_lengths(length_log_probs, None, False, 1, 100, min_len=4).tolist() == [[4], [7]]


def test_a_block_decodes_a_sentence_predicted_shorter_than_the_block(cmlm):
    task, model = cmlm
    gen = MHGenerator([model], task.tgt_dict, mh_cfg(mh_block_size=10, mh_burn_in_epochs=1, mh_sample_epochs=1),
                      seed=1)  # fmt: skip
    hypos = gen.generate([model], batch(task, [0]))
    assert len(hypos) == 1 and all(len(h["tokens"]) == 10 + 1 for h in hypos[0])  # 10 tokens and EOS


def test_a_model_that_is_not_a_masked_lm_is_refused():
    task, model, _ = tiny.build("transformer", ["--criterion", "cross_entropy"], num_symbols=8)
    with pytest.raises(ValueError, match="TransformerModel, not a conditional masked LM.*cmlm_transformer"):
        MHGenerator([model], task.tgt_dict, mh_cfg(), seed=1)


def test_the_task_parses_the_recipes_flags(tmp_path):
    data = str(tmp_path)
    tiny.write_dictionary(data, 8)
    flags = [
        "--mh-sampler", "gibbs", "--mh-energy", "raw", "--mh-proposal-temperature", "0.8", "--mh-top-p", "0.95",
        "--mh-block-size", "4", "--mh-block-anneal", "--mh-order", "left_to_right", "--mh-burn-in-epochs", "3",
        "--mh-sample-epochs", "5", "--mh-chains", "6", "--mh-length-beam", "2", "--mh-target-temperature", "0.9",
        "--mh-target-temperature-step", "0.02", "--mh-target-temperature-floor", "0.1",
        "--mh-forced-accept-epochs", "2", "--mh-output", "best", "--mh-stats-path", str(tmp_path / "s.jsonl"),
        "--mh-max-tokens-per-pass", "4096", "--seed", "5",
    ]  # fmt: skip
    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, [data, "--user-dir", cli.USER_DIR, "--task", "translation_mh",
                                                "-s", "src", "-t", "tgt", *flags])  # fmt: skip
    task = tasks.setup_task(args)
    assert type(task).__name__ == "TranslationMHTask"
    cfg = task.cfg
    assert (cfg.mh_sampler, cfg.mh_energy, cfg.mh_proposal_temperature, cfg.mh_top_p) == ("gibbs", "raw", 0.8, 0.95)
    assert (cfg.mh_block_size, cfg.mh_block_anneal, cfg.mh_order) == (4, True, "left_to_right")
    assert (cfg.mh_burn_in_epochs, cfg.mh_sample_epochs, cfg.mh_chains, cfg.mh_length_beam) == (3, 5, 6, 2)
    assert (cfg.mh_target_temperature, cfg.mh_target_temperature_step, cfg.mh_target_temperature_floor) == (
        0.9, 0.02, 0.1)  # fmt: skip
    assert (cfg.mh_forced_accept_epochs, cfg.mh_output, cfg.mh_max_tokens_per_pass) == (2, "best", 4096)
    defaults = options.parse_args_and_arch(options.get_generation_parser(), [
        data, "--user-dir", cli.USER_DIR, "--task", "translation_mh", "-s", "src", "-t", "tgt"])  # fmt: skip
    assert (defaults.mh_burn_in_epochs, defaults.mh_sample_epochs, defaults.mh_sampler) == (7, 26, "mh")
    with pytest.raises(ValueError, match="--mh-top-p"):
        tasks.setup_task(options.parse_args_and_arch(options.get_generation_parser(), [
            data, "--user-dir", cli.USER_DIR, "--task", "translation_mh", "-s", "src", "-t", "tgt",
            "--mh-top-p", "0"]))  # fmt: skip


# -- end to end through the CLI ------------------------------------------------------------------------------
CMLM_FLAGS = [
    "--task", "translation_lev", "--noise", "random_mask", "--criterion", "nat_loss", "--arch", "cmlm_transformer",
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
    "--decoder-attention-heads", "2", "--share-all-embeddings", "--pred-length-offset", "--dropout", "0",
    "--max-tokens", "500", "--max-update", "20",
]  # fmt: skip


@pytest.fixture(scope="module")
def cmlm_checkpoint(reverse_data_bin, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("cmlm_ckpt"))
    cli.train(reverse_data_bin, save, CMLM_FLAGS)
    return os.path.join(save, "checkpoint_last.pt")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ["--mh-sampler", "mh", "--mh-energy", "raw", "--mh-block-size", "2", "--mh-block-anneal"],
        ["--mh-sampler", "gibbs", "--mh-proposal-temperature", "0.8"],
        ["--mh-sampler", "mask_predict", "--iter-decode-max-iter", "3"],
    ],
    ids=["mh", "gibbs", "mask_predict"],
)
def test_fairseq_generate_decodes_every_sentence(reverse_data_bin, cmlm_checkpoint, tmp_path, flags):
    stats = tmp_path / "stats.jsonl"
    common = ["--task", "translation_mh", "--batch-size", "7", "--mh-chains", "2", "--mh-burn-in-epochs", "1",
              "--mh-sample-epochs", "1", "--mh-stats-path", str(stats)]  # fmt: skip
    out = cli.generate(reverse_data_bin, cmlm_checkpoint, common + flags)  # raises unless every sentence got one
    n = cli.count_lines(reverse_data_bin, "test")
    assert len(cli.hypotheses(out)) == n
    lines = [json.loads(line) for line in stats.read_text().splitlines()] if stats.exists() else []
    if flags[1] == "mask_predict":
        assert lines == []
    else:
        assert len(lines) == 3 * -(-n // 7)  # (warm start + 2 epochs) per batch of 7
        assert sum(r["chains"] for r in lines if r["epoch"] == 0) == 2 * n
        assert all(list(r) == STATS_KEYS for r in lines)


@pytest.mark.slow
def test_fairseq_generate_refuses_a_checkpoint_that_is_not_a_masked_lm(reverse_data_bin, tmp_path):
    save = str(tmp_path / "transformer")
    cli.train(reverse_data_bin, save, cli.TINY_TRANSFORMER + ["--task", "translation", "--max-update", "2",
                                                             "--max-tokens", "500"])  # fmt: skip
    args = [reverse_data_bin, "--path", os.path.join(save, "checkpoint_last.pt"), "--cpu", "--task",
            "translation_mh", "--gen-subset", "test", "--mh-chains", "1"]  # fmt: skip
    out = cli.run_cli("fairseq-generate", args, check=False)
    assert "not a conditional masked LM" in out and "H-" not in out
