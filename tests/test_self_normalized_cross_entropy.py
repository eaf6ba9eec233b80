"""self_normalized_cross_entropy: lambda = 0 is cross-entropy; the penalty is lambda * sum (log Z)^2;
its statistics; training drives log Z to 0 (thesis section 5.3.1, Table 5.1)."""
import os
import re

import pytest
import torch
from fairseq.logging import metrics

from fairseq_ext.criterions.self_normalized_cross_entropy import SelfNormalizedCrossEntropyCriterion
from fairseq_ext.testing import cli, tiny

PAIRS = [([0, 1, 2, 3], [3, 2, 1, 0]), ([4, 5], [5, 4, 5, 4, 1]), ([1, 1, 2], [2])]


def build(arch, *flags):
    torch.manual_seed(1)
    return tiny.build(arch, ["--label-smoothing", "0.1", *flags])


def loss_and_grads(criterion, model, sample, reduce=True):
    model.zero_grad()
    loss, _, log = criterion(model, sample, reduce=reduce)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, log


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_lambda_0_is_exactly_label_smoothed_cross_entropy(arch):
    task, model, sn = build(arch, "--criterion", "self_normalized_cross_entropy", "--self-norm-lambda", "0")
    _, _, ce = build(arch, "--criterion", "label_smoothed_cross_entropy")
    sample = tiny.translation_batch(task, PAIRS)
    model.train()
    loss_sn, grads_sn, log = loss_and_grads(sn, model, sample)
    loss_ce, grads_ce, _ = loss_and_grads(ce, model, sample)
    assert torch.equal(loss_sn, loss_ce)
    assert grads_sn.keys() == grads_ce.keys() and all(torch.equal(grads_sn[k], grads_ce[k]) for k in grads_sn)
    assert log["log_z_count"] == sample["ntokens"]


def test_the_penalty_is_lambda_times_the_summed_squared_log_normalisers():
    task, model, sn = build("transformer", "--criterion", "self_normalized_cross_entropy", "--self-norm-lambda", "0.3")
    _, _, ce = build("transformer", "--criterion", "label_smoothed_cross_entropy")
    sample = tiny.translation_batch(task, PAIRS)
    model.eval()
    logits = model(**sample["net_input"])[0].double()  # B x T x V
    mask = sample["target"].ne(task.target_dictionary.pad())
    # the slow way: each target position's log Z, one at a time
    expected = sum(
        torch.log(torch.exp(logits[b, t]).sum()) ** 2
        for b in range(logits.size(0)) for t in range(logits.size(1)) if mask[b, t]
    )  # fmt: skip
    penalty = sn(model, sample)[0] - ce(model, sample)[0]
    torch.testing.assert_close(penalty.double(), 0.3 * expected, rtol=1e-5, atol=1e-4)
    unreduced = sn(model, sample, reduce=False)[0]
    torch.testing.assert_close(unreduced.sum(), sn(model, sample)[0], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="--self-norm-lambda must be >= 0"):
        build("transformer", "--criterion", "self_normalized_cross_entropy", "--self-norm-lambda", "-1")


def test_metrics_are_the_mean_and_variance_over_all_positions():
    values = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([10.0])]  # two batches of one interval
    logs = [{"loss": 1.0, "nll_loss": 1.0, "ntokens": len(v), "nsentences": 1, "sample_size": len(v),
             "log_z_sum": float(v.sum()), "log_z_sq_sum": float((v ** 2).sum()), "log_z_count": len(v)}
            for v in values]  # fmt: skip
    with metrics.aggregate() as agg:
        SelfNormalizedCrossEntropyCriterion.reduce_metrics(logs)
    allv = torch.cat(values)
    got = agg.get_smoothed_values()
    assert got["log_z_mean"] == pytest.approx(float(allv.mean()), abs=1e-3)
    assert got["log_z_var"] == pytest.approx(float(allv.var(unbiased=False)), abs=1e-3)
    assert not any(k.startswith("_") for k in got)


def last_valid(log, key):
    lines = [ln for ln in log.splitlines() if "| valid |" in ln]
    return float(re.search(rf"\| {key} (-?[0-9.]+)", lines[-1]).group(1))


@pytest.mark.slow  # two fairseq-train runs and a fairseq-generate
def test_training_drives_log_z_to_zero_and_logs_train_and_valid_statistics(reverse_data_bin, tmp_path):
    flags = cli.TINY_TRANSFORMER + ["--max-epoch", "6", "--max-tokens", "500", "--label-smoothing", "0.1"]
    ce_log = cli.train(reverse_data_bin, str(tmp_path / "ce"), flags + ["--criterion", "self_normalized_cross_entropy",
                                                                    "--self-norm-lambda", "0"])  # fmt: skip
    sn_log = cli.train(reverse_data_bin, str(tmp_path / "sn"), flags + ["--criterion", "self_normalized_cross_entropy",
                                                                    "--self-norm-lambda", "1"])  # fmt: skip
    assert re.search(r"\| train \| .*log_z_mean", sn_log) and re.search(r"\| valid \| .*log_z_var", sn_log)
    ce_mean, sn_mean = last_valid(ce_log, "log_z_mean"), last_valid(sn_log, "log_z_mean")
    print(f"valid log Z mean: CE {ce_mean}, self-normalised {sn_mean}")
    assert abs(sn_mean) < 0.5 < abs(ce_mean)  # Table 5.1's contrast, on a toy task
    out = cli.generate(reverse_data_bin, os.path.join(str(tmp_path / "sn"), "checkpoint_last.pt"), ["--beam", "2"])
    assert len(cli.hypotheses(out)) == 20  # every test sentence of the shared fixture
