"""The exercise checks of helpers/check.py: the reference passes, plausible wrong answers fail with a hint."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
from scipy import sparse
from torch.nn import functional as F

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


def test_rollout_accepts_reference_and_rejects_wrong_answers(capsys):
    def solution(attn, residual=0.5):  # the chapter's solution
        a = attn.mean(1)
        a = (1 - residual) * a + residual * torch.eye(a.shape[-1])
        a = a / a.sum(-1, keepdim=True)
        r = a[0]
        for layer in a[1:]:
            r = layer @ r
        return r

    assert check.rollout(solution)
    assert capsys.readouterr().out.strip() == "pass"

    def wrong_order(attn, residual=0.5):  # multiplies the layers bottom-up: R = Â_1 ... Â_L
        a = (1 - residual) * attn.mean(1) + residual * torch.eye(attn.shape[-1])
        r = a[0]
        for layer in a[1:]:
            r = r @ layer
        return r

    assert not check.rollout(wrong_order)
    out = capsys.readouterr().out
    assert "order matters" in out and "hint:" in out

    def fixed_half(attn, residual=0.5):  # ignores the residual argument
        return solution(attn, 0.5)

    assert not check.rollout(fixed_half)
    assert "residual = 0.2" in capsys.readouterr().out


def test_rollout_reports_an_exception(capsys):
    def broken(attn, residual=0.5):
        raise TypeError("oops")

    assert not check.rollout(broken)
    assert "raised TypeError: oops" in capsys.readouterr().out


def test_grad_rollout_accepts_reference_and_rejects_wrong_answers(capsys):
    def solution(attn, grad):
        r = torch.eye(attn.shape[-1])
        for layer in (grad * attn).clamp_min(0).mean(1):
            r = r + layer @ r
        return r

    assert check.grad_rollout(solution)
    assert capsys.readouterr().out.strip() == "pass"

    def clamp_after_mean(attn, grad):  # averages the heads before dropping negative parts
        r = torch.eye(attn.shape[-1])
        for layer in (grad * attn).mean(1).clamp_min(0):
            r = r + layer @ r
        return r

    assert not check.grad_rollout(clamp_after_mean)
    out = capsys.readouterr().out
    assert "one with a negative gradient" in out and "hint:" in out

    def no_clamp(attn, grad):
        r = torch.eye(attn.shape[-1])
        for layer in (grad * attn).mean(1):
            r = r + layer @ r
        return r

    assert not check.grad_rollout(no_clamp)
    assert "negative gradient: the layer counts for nothing" in capsys.readouterr().out


def test_node_recall_accepts_reference_and_rejects_wrong_answers(capsys):
    def solution(adjacency, membership):
        dense = adjacency.toarray()
        member = np.eye(membership.max() + 1)[membership]      # [word, community] one-hot
        degree = dense.sum(1, keepdims=True)
        return np.divide(dense @ member, degree, out=np.zeros((len(dense), member.shape[1])), where=degree > 0)

    assert check.node_recall(solution)
    assert capsys.readouterr().out.strip() == "pass"

    def by_neighbours(adjacency, membership):  # counts neighbours instead of weighing the edges
        binary = (adjacency.toarray() > 0).astype(float)
        return solution(sparse.csr_matrix(binary), membership)

    assert not check.node_recall(by_neighbours)
    out = capsys.readouterr().out
    assert "three words, weights 2 and 1" in out and "hint:" in out

    def nan_for_isolated(adjacency, membership):  # 0 / 0 on a word with no edge
        dense = adjacency.toarray()
        with np.errstate(invalid="ignore"):
            return dense @ np.eye(membership.max() + 1)[membership] / dense.sum(1, keepdims=True)

    assert not check.node_recall(nan_for_isolated)
    assert "isolated word" in capsys.readouterr().out


def test_pmi_accepts_reference_and_rejects_wrong_answers(capsys):
    def solution(adjacency):
        total = sparse.triu(adjacency, k=1).sum()
        degree = np.asarray(adjacency.sum(axis=1)).ravel()
        coo = adjacency.tocoo()
        values = np.log(coo.data * total / (degree[coo.row] * degree[coo.col]))
        return sparse.csr_matrix((values, (coo.row, coo.col)), shape=adjacency.shape)

    assert check.pmi(solution)
    assert capsys.readouterr().out.strip() == "pass"

    def doubled_total(adjacency):  # W = adjacency.sum() counts every edge twice
        coo = adjacency.tocoo()
        degree = np.asarray(adjacency.sum(axis=1)).ravel()
        values = np.log(coo.data * adjacency.sum() / (degree[coo.row] * degree[coo.col]))
        return sparse.csr_matrix((values, (coo.row, coo.col)), shape=adjacency.shape)

    assert not check.pmi(doubled_total)
    out = capsys.readouterr().out
    assert "one edge" in out and "upper triangle" in out
    assert not check.pmi(lambda adjacency: adjacency.toarray()[:2])      # wrong shape
    assert "expected shape" in capsys.readouterr().out


def test_document_vector_accepts_reference_and_rejects_wrong_answers(capsys):
    def solution(x, mask, u, tau):
        scores = (x @ u / tau).masked_fill(~mask, float("-inf"))
        alpha = torch.nan_to_num(scores.softmax(-1))                   # a text with no word: α = 0
        return torch.einsum("bp,bpd->bd", alpha, x)

    assert check.document_vector(solution)
    assert capsys.readouterr().out.strip() == "pass"

    def no_mask(x, mask, u, tau):  # padding takes part in the softmax
        return torch.einsum("bp,bpd->bd", (x @ u / tau).softmax(-1), x)

    assert not check.document_vector(no_mask)
    out = capsys.readouterr().out
    assert "padding gets no weight" in out and "hint:" in out

    def no_tau(x, mask, u, tau):  # forgets the temperature
        return solution(x, mask, u, 1.0)

    assert not check.document_vector(no_tau)
    assert "tau = 0.1 (sharper)" in capsys.readouterr().out
    assert not check.document_vector(lambda x, mask, u, tau: 1 / 0)
    assert "raised ZeroDivisionError" in capsys.readouterr().out


def test_leave_one_out_accepts_reference_and_rejects_wrong_answers(capsys):
    def solution(model, input_ids, attention_mask, target):
        rows = torch.arange(len(input_ids))
        full = model.predict_proba(input_ids, attention_mask)[rows, target]
        out = torch.zeros(input_ids.shape)
        for t in range(input_ids.shape[1]):
            deleted = attention_mask.clone()
            deleted[:, t] = 0
            out[:, t] = (full - model.predict_proba(input_ids, deleted)[rows, target]) * attention_mask[:, t]
        return out

    assert check.leave_one_out(solution)
    assert capsys.readouterr().out.strip() == "pass"

    def reversed_sign(model, input_ids, attention_mask, target):  # p(without t) - p(with t)
        return -solution(model, input_ids, attention_mask, target)

    assert not check.leave_one_out(reversed_sign)
    out = capsys.readouterr().out
    assert "one word" in out and "hint:" in out

    def predicted_class(model, input_ids, attention_mask, target):  # explains the prediction, not the target
        return solution(model, input_ids, attention_mask, model.predict_proba(input_ids, attention_mask).argmax(1))

    assert not check.leave_one_out(predicted_class)
    assert "not the prediction" in capsys.readouterr().out


def test_attention_entropy_accepts_reference_and_rejects_wrong_answers(capsys):
    def solution(attn, mask, eps=1e-4):
        n = mask.sum(1).float()[None, :, None, None, None]                 # [1, batch, 1, 1, 1]
        keys = mask[None, :, None, None, :].float()
        p = (1 - eps) * attn + eps * keys / n
        rows = -torch.special.xlogy(p, p).sum(-1)                         # [layer, batch, head, query]
        return (rows * mask[None, :, None, :]).sum(-1) / n[..., 0, 0]

    assert check.attention_entropy(solution)
    assert capsys.readouterr().out.strip() == "pass"

    def over_width(attn, mask, eps=1e-4):  # smooths and averages over the padded width
        p = (1 - eps) * attn + eps / attn.shape[-1]
        return (-(p * p.log()).sum(-1)).mean(-1)

    assert not check.attention_entropy(over_width)
    out = capsys.readouterr().out
    assert "uniform over 2 real tokens out of 4" in out and "hint:" in out

    def no_smoothing(attn, mask):  # 0 * log 0 = NaN
        return (-(attn * attn.log()).sum(-1)).mean(-1)

    assert not check.attention_entropy(no_smoothing)
    assert "one-hot rows" in capsys.readouterr().out


def test_word_attention_accepts_reference_and_rejects_wrong_answers(capsys):
    def solution(attn, word_index):
        n_words = int(word_index.max()) + 1
        member = (word_index[:, None, :] == torch.arange(n_words)[None, :, None]).float()   # [batch, word, piece]
        mean = member / member.sum(-1, keepdim=True).clamp_min(1)
        return torch.einsum("bwp,lbhpk,bvk->lbhwv", mean, attn, member)

    assert check.word_attention(solution)
    assert capsys.readouterr().out.strip() == "pass"

    def mean_both_ways(attn, word_index):  # averages the pieces of the key word too: rows no longer sum to 1
        n_words = int(word_index.max()) + 1
        member = (word_index[:, None, :] == torch.arange(n_words)[None, :, None]).float()
        mean = member / member.sum(-1, keepdim=True).clamp_min(1)
        return torch.einsum("bwp,lbhpk,bvk->lbhwv", mean, attn, mean)

    assert not check.word_attention(mean_both_ways)
    out = capsys.readouterr().out
    assert "pieces 1 and 2 form word 1" in out and "hint:" in out

    def swapped(attn, word_index):  # sums the query pieces, averages the key pieces
        n_words = int(word_index.max()) + 1
        member = (word_index[:, None, :] == torch.arange(n_words)[None, :, None]).float()
        mean = member / member.sum(-1, keepdim=True).clamp_min(1)
        return torch.einsum("bwp,lbhpk,bvk->lbhwv", member, attn, mean)

    assert not check.word_attention(swapped)
    assert "largest difference" in capsys.readouterr().out


def test_ffn_coefficients_accepts_reference_and_rejects_wrong_answers(capsys):
    assert check.ffn_coefficients(lambda mlp, x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert capsys.readouterr().out.strip() == "pass"
    assert not check.ffn_coefficients(lambda mlp, x: mlp.gate_proj(x) * mlp.act_fn(mlp.up_proj(x)))  # SiLU on up
    out = capsys.readouterr().out
    assert "hand-made layer, x = [1, -2]" in out and "hint:" in out and "gate only" in out
    assert not check.ffn_coefficients(lambda mlp, x: mlp(x))                                         # the output
    assert "shape" in capsys.readouterr().out


def test_ffn_coefficients_reports_an_exception(capsys):
    assert not check.ffn_coefficients(lambda mlp, x: mlp.gate(x))
    assert "raised AttributeError" in capsys.readouterr().out


def test_value_logits_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(model, layer, dims):
        v = model.model.layers[layer].mlp.down_proj.weight[:, dims].T
        return (v * model.model.norm.weight) @ model.lm_head.weight.T

    assert check.value_logits(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def no_gain(model, layer, dims):  # skips the final norm's gain
        return model.model.layers[layer].mlp.down_proj.weight[:, dims].T @ model.lm_head.weight.T

    assert not check.value_logits(no_gain)
    out = capsys.readouterr().out
    assert "layer 0, memories [0, 5]" in out and "largest difference" in out and "hint:" in out

    def rows(model, layer, dims):  # a row of down_proj is not a value
        return model.model.layers[layer].mlp.down_proj.weight[dims] @ model.lm_head.weight.T

    assert not check.value_logits(rows)
    assert "raised" in capsys.readouterr().out


def test_term_importance_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(terms):
        e = terms.sum(-4, keepdim=True)
        return (terms * e).sum(-1) / (e * e).sum(-1)

    assert check.term_importance(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def cosine(terms):  # the angle, not the share
        e = terms.sum(-4, keepdim=True)
        return torch.nn.functional.cosine_similarity(terms, e, dim=-1)

    assert not check.term_importance(cosine)
    out = capsys.readouterr().out
    assert "two terms, one token" in out and "expected [0.25, 0.75]" in out and "hint:" in out

    def first_axis(terms):  # sums over dim 0, wrong once a layer axis leads
        e = terms.sum(0, keepdim=True)
        return (terms * e).sum(-1) / (e * e).sum(-1)

    assert not check.term_importance(first_axis)
    assert "layer axis" in capsys.readouterr().out


def test_push_layer_norm_mickus_accepts_reference_and_rejects_wrong_answers(capsys):
    def sigma_of_sum(terms, ln):
        z = terms.sum(0)
        return z, torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + ln.eps)

    def reference(terms, ln):
        z, sigma = sigma_of_sum(terms, ln)
        out = ln.weight * terms / sigma
        out[-1] = out[-1] - ln.weight * z.mean(-1, keepdim=True) / sigma + ln.bias
        return out

    assert check.push_layer_norm_mickus(reference)
    assert capsys.readouterr().out.strip() == "pass"
    assert not check.push_layer_norm_mickus(lambda terms, ln: torch.stack([ln(t) for t in terms]))  # own sigmas
    out = capsys.readouterr().out
    assert "do not add up" in out and "two terms, plain LayerNorm" in out and "hint:" in out

    def centred(terms, ln):  # the chapter's ln_push: exact, but the other split
        _, sigma = sigma_of_sum(terms, ln)
        out = ln.weight * (terms - terms.mean(-1, keepdim=True)) / sigma
        out[-1] = out[-1] + ln.bias
        return out

    assert not check.push_layer_norm_mickus(centred)
    assert "shared out differently" in capsys.readouterr().out

    def no_correction(terms, ln):  # forgets the mean correction
        _, sigma = sigma_of_sum(terms, ln)
        out = ln.weight * terms / sigma
        out[-1] = out[-1] + ln.bias
        return out

    assert not check.push_layer_norm_mickus(no_correction)
    assert "do not add up" in capsys.readouterr().out


def test_fvu_accepts_reference_and_rejects_wrong_answers(capsys):
    assert check.fvu(lambda x, x_hat: (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert capsys.readouterr().out.strip() == "pass"
    assert not check.fvu(lambda x, x_hat: (x - x_hat).pow(2).sum() / x.pow(2).sum())      # not centred
    out = capsys.readouterr().out
    assert "x far from 0" in out and "hint:" in out
    assert not check.fvu(lambda x, x_hat: ((x - x_hat).pow(2).sum(-1) / (x - x.mean(0)).pow(2).sum(-1)).mean())
    assert "expected" in capsys.readouterr().out                                          # mean of ratios
    assert not check.fvu(lambda x, x_hat: (x - x_hat).pow(2).sum(-1) / (x - x.mean(0)).pow(2).sum(-1))  # per token
    assert "expected one number" in capsys.readouterr().out


def test_rationale_mask_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(attributions, candidates, fraction):
        scores = attributions.masked_fill(~candidates, -math.inf)
        order = scores.argsort(dim=1, descending=True, stable=True)
        k = torch.ceil(candidates.sum(1) * fraction).long().clamp_min(1)
        keep = torch.arange(scores.shape[1]) < k[:, None]
        return torch.zeros_like(candidates).scatter(1, order, keep) & candidates

    assert check.rationale_mask(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def all_tokens(attributions, candidates, fraction):  # ranks [CLS] and [SEP] too
        return reference(attributions, torch.ones_like(candidates), fraction)

    assert not check.rationale_mask(all_tokens)
    out = capsys.readouterr().out
    assert "[CLS] and [SEP] are not candidates" in out and "hint:" in out

    def floor(attributions, candidates, fraction):  # int() instead of ceil
        scores = attributions.masked_fill(~candidates, -math.inf)
        order = scores.argsort(dim=1, descending=True, stable=True)
        k = (candidates.sum(1) * fraction).long()
        keep = torch.arange(scores.shape[1]) < k[:, None]
        return torch.zeros_like(candidates).scatter(1, order, keep) & candidates

    assert not check.rationale_mask(floor)
    assert "rounds up" in capsys.readouterr().out


def test_comprehensiveness_accepts_reference_and_rejects_wrong_answers(capsys):
    from helpers import evaluation

    def reference(predict, ids, am, attributions, target, fraction):
        full = predict(ids, am)[torch.arange(len(ids)), target]
        rationale = evaluation.rationale_mask(attributions, am.bool(), fraction)
        ids2, am2 = evaluation.delete_tokens(ids, am, rationale)
        return full - predict(ids2, am2)[torch.arange(len(ids)), target]

    assert check.comprehensiveness(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def keeps_rationale(predict, ids, am, attributions, target, fraction):  # sufficiency, not comprehensiveness
        full = predict(ids, am)[torch.arange(len(ids)), target]
        rationale = evaluation.rationale_mask(attributions, am.bool(), fraction)
        ids2, am2 = evaluation.delete_tokens(ids, am, am.bool() & ~rationale)
        return full - predict(ids2, am2)[torch.arange(len(ids)), target]

    assert not check.comprehensiveness(keeps_rationale)
    out = capsys.readouterr().out
    assert "deletes token 3" in out and "hint:" in out

    def class_one(predict, ids, am, attributions, target, fraction):  # ignores the target
        return reference(predict, ids, am, attributions, torch.ones_like(target), fraction)

    assert not check.comprehensiveness(class_one)
    assert "target class 0" in capsys.readouterr().out


def test_deletion_curve_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(predict, images, saliency, target, steps):
        n = saliency[0].numel()
        order = saliency.flatten(1).argsort(dim=1, descending=True, stable=True)
        points = []
        for i in range(steps + 1):
            drop = torch.zeros_like(saliency.flatten(1), dtype=torch.bool)
            drop.scatter_(1, order[:, :round(i * n / steps)], True)
            x = images * ~drop.reshape(saliency.shape)[:, None]
            points.append(predict(x)[torch.arange(len(images)), target])
        return torch.stack(points, 1)

    assert check.deletion_curve(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def least_first(predict, images, saliency, target, steps):  # deletes the least salient pixels first
        return reference(predict, images, -saliency, target, steps)

    assert not check.deletion_curve(least_first)
    out = capsys.readouterr().out
    assert "pixels [[1, 2], [3, 4]]" in out and "expected [1.0, 0.6, 0.3, 0.1, 0.0]" in out and "hint:" in out

    def floor_counts(predict, images, saliency, target, steps):  # int(i * n / steps) instead of round
        n = saliency[0].numel()
        order = saliency.flatten(1).argsort(dim=1, descending=True, stable=True)
        points = []
        for i in range(steps + 1):
            drop = torch.zeros_like(saliency.flatten(1), dtype=torch.bool)
            drop.scatter_(1, order[:, :int(i * n / steps)], True)
            points.append(predict(images * ~drop.reshape(saliency.shape)[:, None])[torch.arange(len(images)), target])
        return torch.stack(points, 1)

    assert not check.deletion_curve(floor_counts)
    assert "4 pixels in 3 steps" in capsys.readouterr().out


def test_map_rank_correlation_accepts_reference_and_rejects_wrong_answers(capsys):
    from scipy.stats import rankdata

    def reference(a, b):
        ra = torch.as_tensor(rankdata(a.flatten(1).numpy(), axis=1))
        rb = torch.as_tensor(rankdata(b.flatten(1).numpy(), axis=1))
        ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
        return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))

    assert check.map_rank_correlation(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def pearson(a, b):  # correlates values, not ranks
        a, b = a.flatten(1), b.flatten(1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    assert not check.map_rank_correlation(pearson)
    out = capsys.readouterr().out
    assert "b = a cubed" in out and "hint:" in out

    def ordinal(a, b):  # argsort twice: ranks, but ties are not averaged
        return pearson(a.flatten(1).argsort(1).argsort(1).double(), b.flatten(1).argsort(1).argsort(1).double())

    assert not check.map_rank_correlation(ordinal)
    assert "ties get their average rank" in capsys.readouterr().out


def test_hit_rate_ndcg_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(scores, targets, k):
        target = scores.gather(1, targets[:, None])
        rank = (scores > target).sum(1) + (scores == target).sum(1) - 1
        hit = (rank < k).double()
        return float(hit.mean()), float((hit / torch.log2(rank.double() + 2)).mean())

    assert check.hit_rate_ndcg(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def log_off_by_one(scores, targets, k):  # log2(rank + 1) with 0-based ranks: division by zero at rank 0
        target = scores.gather(1, targets[:, None])
        rank = (scores > target).sum(1) + (scores == target).sum(1) - 1
        hit = (rank < k).double()
        return float(hit.mean()), float((hit / torch.log2(rank.double() + 1)).mean())

    assert not check.hit_rate_ndcg(log_off_by_one)
    out = capsys.readouterr().out
    assert "target ranked first" in out and "hint:" in out

    def ties_in_favour(scores, targets, k):  # a tie does not count against the target
        target = scores.gather(1, targets[:, None])
        rank = (scores > target).sum(1)
        hit = (rank < k).double()
        return float(hit.mean()), float((hit / torch.log2(rank.double() + 2)).mean())

    assert not check.hit_rate_ndcg(ties_in_favour)
    assert "a tie with the target" in capsys.readouterr().out
    assert not check.hit_rate_ndcg(lambda s, t, k: None)
    assert "raised" in capsys.readouterr().out


def test_contrastive_loss_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(image_emb, text_emb, logit_scale):
        logits = logit_scale * image_emb @ text_emb.T
        target = torch.arange(len(logits))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    assert check.contrastive_loss(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def one_direction(image_emb, text_emb, logit_scale):  # image→text only
        logits = logit_scale * image_emb @ text_emb.T
        return F.cross_entropy(logits, torch.arange(len(logits)))

    assert not check.contrastive_loss(one_direction)
    out = capsys.readouterr().out
    assert "random batch of 6" in out and "hint:" in out and "logits.T" in out
    assert not check.contrastive_loss(lambda i, t, s: reference(i, t, 1.0))      # forgets the temperature
    assert "scale 10" in capsys.readouterr().out


def test_contrastive_loss_reports_an_exception(capsys):
    def broken(image_emb, text_emb, logit_scale):
        raise RuntimeError("shape mismatch")

    assert not check.contrastive_loss(broken)
    assert "raised RuntimeError: shape mismatch" in capsys.readouterr().out


def test_choquet_integral_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(x, mu):
        total, previous, remaining = 0.0, 0.0, len(mu) - 1
        for i in np.argsort(x):
            total += (x[i] - previous) * mu[remaining]
            previous, remaining = x[i], remaining & ~(1 << int(i))
        return total

    assert check.choquet_integral(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def weighted_sum(x, mu):  # reads only the singletons' capacities
        return sum(x[i] * mu[1 << i] for i in range(len(x)))

    assert not check.choquet_integral(weighted_sum)
    out = capsys.readouterr().out
    assert "the minimum" in out and "hint:" in out

    def passed_set(x, mu):  # weights each step by the criteria already passed, not those still to come
        total, previous, passed = 0.0, 0.0, 0
        for i in np.argsort(x):
            passed |= 1 << int(i)
            total += (x[i] - previous) * mu[passed]
            previous = x[i]
        return total

    assert not check.choquet_integral(passed_set)
    assert "expected" in capsys.readouterr().out


def test_concept_auc_accepts_reference_and_rejects_wrong_answers(capsys):
    from helpers.rare import concept_auc as reference

    assert check.concept_auc(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def ordinal_ranks(scores, positives):  # ranks from argsort: ties broken by position
        ranks = scores.argsort(0, kind="stable").argsort(0) + 1
        n_pos = positives.sum(0)
        n_neg = len(scores) - n_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = ((ranks * positives).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)

    assert not check.concept_auc(ordinal_ranks)
    out = capsys.readouterr().out
    assert "ties count one half" in out and "hint:" in out
    assert not check.concept_auc(lambda s, p: reference(s, p)[0])             # one number, not one per concept
    assert "shape" in capsys.readouterr().out


def test_within_class_auc_accepts_reference_and_rejects_wrong_answers(capsys):
    from helpers import rare

    def reference(scores, positives, labels):
        per_class = np.stack([rare.concept_auc(scores[labels == c], positives[labels == c])
                              for c in np.unique(labels)])
        with warnings.catch_warnings():  # nanmean warns on an all-nan column
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(per_class, 0)

    assert check.within_class_auc(reference)
    assert capsys.readouterr().out.strip() == "pass"
    assert not check.within_class_auc(lambda s, p, y: rare.concept_auc(s, p))   # AUC over all images at once
    out = capsys.readouterr().out
    assert "a class detector: the positives score high" in out and "hint:" in out

    def plain_mean(scores, positives, labels):  # nan classes poison the mean
        return np.stack([rare.concept_auc(scores[labels == c], positives[labels == c])
                         for c in np.unique(labels)]).mean(0)

    assert not check.within_class_auc(plain_mean)
    assert "class 1 has only positives" in capsys.readouterr().out


def test_stream_metrics_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(a):
        n = len(a)
        return {"transfer": np.mean([a[:j, j].mean() for j in range(1, n)]), "avg": a.mean(),
                "last": a[-1].mean(), "forgetting": np.mean([a[j:n - 1, j].max() - a[-1, j] for j in range(n - 1)])}

    assert check.stream_metrics(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def diagonal_forgetting(a):  # accuracy right after learning, not the best one
        out = reference(a)
        out["forgetting"] = np.mean([a[j, j] - a[-1, j] for j in range(len(a) - 1)])
        return out

    assert not check.stream_metrics(diagonal_forgetting)
    out = capsys.readouterr().out
    assert "task 0 peaks after step 1, forgetting" in out and "hint:" in out

    def upper_mean(a):  # the mean of the whole upper triangle, not task by task
        out = reference(a)
        out["transfer"] = a[np.triu_indices(len(a), 1)].mean()
        return out

    assert not check.stream_metrics(upper_mean)
    assert "transfer" in capsys.readouterr().out
    assert not check.stream_metrics(lambda a: {"avg": a.mean()})                # missing keys
    assert "raised KeyError" in capsys.readouterr().out


def test_wise_ft_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(zero_shot, fine_tuned, alpha):
        out = copy.deepcopy(fine_tuned)
        z, f = zero_shot.state_dict(), fine_tuned.state_dict()
        out.load_state_dict({k: (1 - alpha) * z[k] + alpha * v if v.is_floating_point() else v for k, v in f.items()})
        return out

    assert check.wise_ft(reference)
    assert capsys.readouterr().out.strip() == "pass"
    assert not check.wise_ft(lambda z, f, alpha: reference(f, z, alpha))        # alpha weighs the wrong model
    out = capsys.readouterr().out
    assert "alpha = 0.0" in out and "hint:" in out

    def parameters_only(zero_shot, fine_tuned, alpha):  # blends the parameters, keeps the fine-tuned buffers
        out = copy.deepcopy(fine_tuned)
        with torch.no_grad():
            for p, q in zip(out.parameters(), zero_shot.parameters(), strict=True):
                p.mul_(alpha).add_((1 - alpha) * q)
        return out

    assert not check.wise_ft(parameters_only)
    assert "running_mean" in capsys.readouterr().out

    def in_place(zero_shot, fine_tuned, alpha):  # overwrites the fine-tuned model
        fine_tuned.load_state_dict(reference(zero_shot, fine_tuned, alpha).state_dict())
        return fine_tuned

    assert not check.wise_ft(in_place)
    assert "in place" in capsys.readouterr().out


def test_nrg_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(scores, reference):
        ref = np.asarray(scores[reference])
        return {k: (np.asarray(v) - ref) / (1 - ref) for k, v in scores.items()}

    assert check.nrg(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def relative_gain(scores, reference):  # divides by the reference's score, not its error
        ref = np.asarray(scores[reference])
        return {k: (np.asarray(v) - ref) / ref for k, v in scores.items()}

    assert not check.nrg(relative_gain)
    out = capsys.readouterr().out
    assert "S [0.8, 0.5] vs M [0.9, 0.6], M" in out and "hint:" in out

    def first_key(scores, reference):  # takes the first representation as the reference
        ref = np.asarray(next(iter(scores.values())))
        return {k: (np.asarray(v) - ref) / (1 - ref) for k, v in scores.items()}

    assert not check.nrg(first_key)
    assert "the reference is not the first key" in capsys.readouterr().out


def test_dimension_purity_accepts_reference_and_rejects_wrong_answers(capsys):
    def reference(feats, labels, top):
        order = np.argsort(-feats, axis=0)[:top]
        return np.array([np.unique(col, return_counts=True)[1].max() / top for col in labels[order].T])

    assert check.dimension_purity(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def top_item_label(feats, labels, top):  # share of the top item's label, not of the most common one
        tops = labels[np.argsort(-feats, axis=0)[:top]]
        return (tops == tops[0]).mean(0)

    assert not check.dimension_purity(top_item_label)
    out = capsys.readouterr().out
    assert "the top item's label is not the most common" in out and "hint:" in out
    assert not check.dimension_purity(lambda f, y, top: reference(np.abs(f), y, top))   # |feats|
    assert "large negative values" in capsys.readouterr().out


def test_ground_truth_auc_accepts_reference_and_rejects_wrong_answers(capsys):
    from scipy.stats import rankdata

    def reference(scores, truth):
        out = []
        for s, t in zip(scores.numpy(), truth.numpy(), strict=True):
            n_pos, n_neg = t.sum(), (~t).sum()
            out.append((rankdata(s)[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg) if n_pos and n_neg
                       else float("nan"))
        return torch.tensor(out, dtype=torch.float64)

    assert check.ground_truth_auc(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def strict_wins(scores, truth):  # counts ties as losses
        out = []
        for s, t in zip(scores, truth, strict=True):
            wins = (s[t][:, None] > s[~t][None, :]).double()
            out.append(wins.mean() if wins.numel() else float("nan"))
        return torch.tensor(out, dtype=torch.float64)

    assert not check.ground_truth_auc(strict_wins)
    out = capsys.readouterr().out
    assert "a tie between a relevant and an irrelevant feature" in out and "hint:" in out
    assert not check.ground_truth_auc(lambda s, t: reference(s.T, t.T))       # per feature, not per item
    assert "shape" in capsys.readouterr().out


def test_sanity_distance_accepts_reference_and_rejects_wrong_answers(capsys):
    from scipy.stats import spearmanr

    def reference(ref, rnd):
        return torch.tensor([1 - abs(spearmanr(a.abs(), b.abs())[0]) for a, b in zip(ref, rnd, strict=True)],
                            dtype=torch.float64)

    assert check.sanity_distance(reference)
    assert capsys.readouterr().out.strip() == "pass"

    def signed_rho(ref, rnd):  # 1 - rho: a reversed ranking counts as more than fully changed
        return torch.tensor([1 - spearmanr(a.abs(), b.abs())[0] for a, b in zip(ref, rnd, strict=True)])

    assert not check.sanity_distance(signed_rho)
    out = capsys.readouterr().out
    assert "ranking of |scores| reversed" in out and "hint:" in out

    def pearson(ref, rnd):  # correlates the values, not their ranks
        a, b = ref.abs(), rnd.abs()
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).abs()

    assert not check.sanity_distance(pearson)
    assert "monotone but not linear" in capsys.readouterr().out
