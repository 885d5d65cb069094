"""run_blocks: batches, label groups with their scope, the real-token mask hooks see, hook hygiene, throughput."""

from contextlib import contextmanager

import pytest
import torch

from moesurgeon.arch import get_adapter
from moesurgeon.block_runner import Batch, label_groups, run_blocks
from moesurgeon.data import TokenBlocks
from moesurgeon.hooks import count_hooks
from tiny_models import tiny_model


def _blocks() -> TokenBlocks:
    ids = torch.randint(3, 96, (7, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    mask[5, 1:] = 0
    labels = torch.tensor([1, 0, 1, -1, 0, 1, 1])  # block 3 is unlabelled
    return TokenBlocks(ids, mask, labels, ["a", "b"])


def test_label_groups_in_label_order_without_unlabelled_or_empty_groups():
    blocks = _blocks()
    groups = label_groups(blocks)
    assert list(groups) == ["a", "b"]
    assert groups["a"].labels.tolist() == [0, 0] and groups["b"].labels.tolist() == [1, 1, 1, 1]
    only_b = TokenBlocks(blocks.input_ids[:1], blocks.attention_mask[:1], blocks.labels[:1], ["a", "b"])
    assert list(label_groups(only_b)) == ["b"]
    plain = TokenBlocks(blocks.input_ids, blocks.attention_mask, torch.full((7,), -1), [])
    assert list(label_groups(plain)) == ["all"] and label_groups(plain)["all"] is plain


def test_router_hooks_see_real_tokens_labels_and_scope():
    model = tiny_model("qwen3_moe")
    layer = get_adapter(model).moe_layers(model)[0]
    blocks = _blocks()
    seen, entered, outputs = [], [], []

    @contextmanager
    def scope(label):
        entered.append(label)
        yield

    def hook(module, inputs, output, batch: Batch):
        real = batch.real(output[2].device)
        assert real.shape == (output[2].shape[0],)  # routers see the flat batch
        seen.append((batch.label, entered[-1], batch.label_ids.tolist(), int(real.sum())))

    done = run_blocks(model, blocks, 3, hooks=[(layer.router, hook)], by_label=True, scope=scope,
                      on_output=lambda batch, out: outputs.append(tuple(out.logits.shape)))
    # group a: blocks 1, 4 (one batch); group b: blocks 0, 2, 5, 6 (batches of 3 and 1); block 3 is not run
    assert seen == [("a", "a", [0, 0], 20), ("b", "b", [1, 1, 1], 10 + 6 + 1), ("b", "b", [1], 10)]
    assert entered == ["a", "b"]
    assert outputs == [(2, 10, 96), (3, 10, 96), (1, 10, 96)]
    assert done.tokens == 47 and done.seconds > 0 and done.tokens_per_s == done.tokens / done.seconds


def test_plain_run_keeps_block_order_and_counts_all_real_tokens():
    model = tiny_model("mixtral")
    layer = get_adapter(model).moe_layers(model)[1]
    blocks = _blocks()
    rows = []
    run_blocks(model, blocks, 4, hooks=[(layer.router, lambda m, i, o, b: rows.append((b.label, b.input_ids.clone())))])
    assert [label for label, _ in rows] == [None, None]
    assert torch.equal(torch.cat([ids for _, ids in rows]), blocks.input_ids)
    assert run_blocks(model, blocks, 4).tokens == blocks.num_tokens() == 70 - 4 - 9


def test_hooks_removed_after_run_and_after_an_error():
    model = tiny_model("olmoe")
    layers = get_adapter(model).moe_layers(model)
    before = count_hooks(model)
    run_blocks(model, _blocks(), 4, hooks=[(layer.router, lambda *a: None) for layer in layers])
    assert count_hooks(model) == before

    def boom(module, inputs, output, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_blocks(model, _blocks(), 4, hooks=[(layers[0].router, boom)])
    assert count_hooks(model) == before
    with pytest.raises(ValueError, match="pass by_label=True"):
        run_blocks(model, _blocks(), 4, scope=lambda label: None)


def test_runs_without_gradients():
    model = tiny_model("qwen3_moe")
    grads = []
    run_blocks(model, _blocks(), 8, on_output=lambda batch, out: grads.append(out.logits.requires_grad))
    assert grads == [False]
