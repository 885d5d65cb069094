"""Perplexity equals the loss transformers computes itself with `labels=`; measure() matches its parts."""

import math

import pytest
import torch

from moesurgeon.arch import get_adapter
from moesurgeon.data import TokenBlocks
from moesurgeon.evaluate import evaluate_perplexity, relative_change
from moesurgeon.measure import measure
from moesurgeon.probe import profile_usage
from moesurgeon.probe.stats import TENSORS
from tiny_models import tiny_model


def _blocks(n: int, seq: int, padded: bool, seed: int = 0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # right padding of different lengths, as the last block of an example has
        for row, keep in ((1, 9), (4, 3), (n - 1, 5)):
            mask[row, keep:] = 0
            ids[row, keep:] = 0
    return TokenBlocks(ids, mask, torch.arange(n) % 2, ["a", "b"])


def _hf_nll(model, blocks: TokenBlocks, batch_size: int, label: int | None = None) -> tuple[float, int]:
    """Sum of per-token NLL and number of predicted tokens from transformers' own `labels=` loss (a mean)."""
    nll, count = 0.0, 0
    for batch in blocks.batches(batch_size):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keep = mask.bool() if label is None else mask.bool() & (batch["label_ids"] == label)[:, None]
        targets = ids.masked_fill(~keep, -100)
        n = int((targets[:, 1:] != -100).sum())  # transformers shifts the labels by one inside the loss
        if n == 0:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, attention_mask=mask, labels=targets, output_router_logits=False).loss
        nll += float(loss) * n
        count += n
    return nll, count


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_perplexity_is_exp_of_transformers_loss_without_padding(family):
    model = tiny_model(family)
    blocks = _blocks(8, 12, padded=False)
    result = evaluate_perplexity(model, blocks, batch_size=4, progress=False)
    nll, count = _hf_nll(model, blocks, 4)
    assert result.tokens["a"] + result.tokens["b"] == count == 8 * 11
    assert result.ppl["all"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # one batch: the perplexity is exactly exp(the loss transformers reports for it)
    with torch.no_grad():
        loss = model(input_ids=blocks.input_ids, labels=blocks.input_ids, output_router_logits=False).loss
    one = evaluate_perplexity(model, blocks, batch_size=8, progress=False)
    assert one.ppl["all"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_nll_sums_match_masked_labels_with_a_padded_last_batch():
    model = tiny_model("mixtral")
    blocks = _blocks(7, 12, padded=True)  # batches of 3, 3, 1: the last one smaller, padding in the first two
    result = evaluate_perplexity(model, blocks, batch_size=3, progress=False)
    for g, name in enumerate(["a", "b"]):
        nll, count = _hf_nll(model, blocks, 3, label=g)
        assert result.tokens[name] == count
        assert result.nll_sum[name] == pytest.approx(nll, rel=1e-5)
        assert result.ppl[name] == pytest.approx(math.exp(nll / count), rel=1e-5)
    nll, count = _hf_nll(model, blocks, 3)
    assert sum(result.tokens.values()) == count == 7 * 11 - (3 + 9 + 7)  # rows cut to 9, 3 and 5 real tokens
    assert result.ppl["all"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_unlabelled_blocks_are_one_group_all():
    model = tiny_model("qwen3_moe")
    labelled = _blocks(6, 10, padded=True)
    blocks = TokenBlocks(labelled.input_ids, labelled.attention_mask, torch.full((6,), -1), [])
    result = evaluate_perplexity(model, blocks, batch_size=4, progress=False)
    nll, count = _hf_nll(model, blocks, 4)
    assert list(result.ppl) == ["all"] and result.tokens == {"all": count}
    assert result.ppl["all"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_measure_matches_its_parts():
    model = tiny_model("olmoe")
    adapter = get_adapter(model)
    blocks = _blocks(9, 12, padded=True)
    whole = measure(model, adapter, blocks, 4, by_label=False)
    ev = evaluate_perplexity(model, blocks, 4, progress=False)
    stats, _ = profile_usage(model, adapter, blocks, 4, progress=False)
    assert whole.ppl == ev.ppl and whole.perplexity.nll_sum == ev.nll_sum
    assert all(torch.equal(getattr(whole.stats, t), getattr(stats, t)) for t in TENSORS)
    # by label: each group batched on its own, as a per-label evaluation of its blocks gives
    grouped = measure(model, adapter, blocks, 4)
    for name in ("a", "b"):
        alone = evaluate_perplexity(model, blocks.select(name), 4, progress=False)
        assert grouped.ppl[name] == alone.ppl[name]
    assert set(grouped.flat("before")) == {"before/ppl/a", "before/ppl/b", "before/ppl/all",
                                           "before/tokens_per_s", "before/probe_tokens_per_s"}
    assert grouped.stats.tokens[0].tolist() == [int(blocks.select(n).attention_mask.sum()) for n in ("a", "b")]


def test_relative_change():
    after, before = {"a": 3.0, "all": 2.0, "x": 1.0}, {"a": 2.0, "all": 4.0, "b": 1.0}
    assert relative_change(after, before) == {"a": 0.5, "all": -0.5}
