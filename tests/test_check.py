"""The exercise checks of helpers/check.py: the reference passes, plausible wrong answers fail with a hint."""

from __future__ import annotations

import torch

from helpers import check


def test_patch_metric_accepts_reference_and_rejects_wrong_answers(capsys):
    assert check.patch_metric(lambda p, c, x: (p - x) / (c - x))
    assert capsys.readouterr().out.strip() == "pass"
    assert not check.patch_metric(lambda p, c, x: p / c)                # forgets the corrupted baseline
    out = capsys.readouterr().out
    assert "patched = corrupted" in out and "hint:" in out
    assert not check.patch_metric(lambda p, c, x: (c - p) / (c - x))    # measures the distance left
    assert "expected" in capsys.readouterr().out


def test_patch_metric_reports_an_exception(capsys):
    def broken(p, c, x):
        raise TypeError("oops")

    assert not check.patch_metric(broken)
    assert "raised TypeError: oops" in capsys.readouterr().out


def test_logit_lens_accepts_reference_and_rejects_wrong_answers(capsys):
    assert check.logit_lens(lambda model, resid: model.lm_head(model.model.norm(resid)))
    assert capsys.readouterr().out.strip() == "pass"
    assert not check.logit_lens(lambda model, resid: model.lm_head(resid))   # skips the final norm
    out = capsys.readouterr().out
    assert "largest difference" in out and "RMSNorm" in out

    def no_gain(model, resid):  # normalises but forgets the learned gain
        return model.lm_head(resid * torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + 1e-6))

    assert not check.logit_lens(no_gain)
    assert not check.logit_lens(lambda model, resid: resid)                  # wrong shape
    assert "shape" in capsys.readouterr().out


def test_topk_activation_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(pre, k):
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    assert check.topk_activation(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def no_relu(pre, k):  # keeps negative values among the k largest
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    assert not check.topk_activation(no_relu)
    out = capsys.readouterr().out
    assert "negatives among the k largest" in out and "hint:" in out

    def by_magnitude(pre, k):  # the largest absolute values
        idx = pre.abs().topk(k, dim=-1).indices
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre.gather(-1, idx)))

    assert not check.topk_activation(by_magnitude)
    assert "large negative entries" in capsys.readouterr().out
    assert not check.topk_activation(lambda pre, k: torch.relu(pre))            # no top-k at all
    assert "expected" in capsys.readouterr().out
