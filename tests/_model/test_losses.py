from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ghist._model._losses import (
    DEFAULT_LOSS_WEIGHTS,
    gene_pearson_loss,
    ghist_losses,
    pixel_targets,
    spot_loss,
    spot_sums,
    tile_composition,
)
from ghist._model._network import GHISTNetwork

SMALL = {"width": 4, "embed_dim": 16, "hidden": 16, "n_heads": 2, "n_tokens": 4}
TYPED_TERMS = {"cell_type", "expr_type", "composition", "type_composition"}
ALL_TERMS = {"pixel", "cell_type", "expr", "specialist", "expr_type", "expr_cosine", "expr_logits"} | {
    "composition",
    "type_composition",
}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_batch(n_types=3, n_genes=6):
    """3 tiles of 24x24 with 2 square nuclei each; cell k has id k + 1."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(3, 24, 24, dtype=torch.long)
    k = 0
    for b in range(3):
        for y in (2, 14):
            k += 1
            labels[b, y : y + 6, 4 + 6 * b : 10 + 6 * b] = k
    labels[0, 20:, 20:] = -1
    return {
        "image": torch.randn(3, 3, 24, 24, generator=gen),
        "labels": labels,
        "cell_batch": torch.tensor([0, 0, 1, 1, 2, 2]),
        "n_cells": 6,
        "cell_type": torch.tensor([0, 1, 2, 0, 1, 2]) if n_types else torch.full((6,), -1),
        "expr": torch.rand(6, n_genes, generator=gen) * 10,
    }


def make_net(n_types=3, groups=None, reference=True, n_genes=6):
    torch.manual_seed(0)
    ref = torch.rand(4, n_genes) * 10 if reference else None
    return GHISTNetwork(n_genes, n_types, reference=ref, groups=groups, **SMALL)


def forward(net, batch):
    return net(batch["image"], batch["labels"], batch["cell_batch"], batch["n_cells"])


def check_grads(net):
    for name, p in net.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def grad_norm(module):
    grads = [p.grad.abs().sum() for p in module.parameters() if p.grad is not None]
    return float(sum(grads)) if grads else 0.0


def test_all_terms_and_weighted_total():
    net = make_net(groups={"a": [0, 1], "b": [2]})
    batch = make_batch()
    out = forward(net, batch)
    losses = ghist_losses(out, batch, net)
    assert set(losses) == ALL_TERMS | {"total"}
    weights = {**DEFAULT_LOSS_WEIGHTS, "specialist": 1 / 3}
    expected = sum(weights[k] * v for k, v in losses.items() if k != "total")
    torch.testing.assert_close(losses["total"], expected)
    assert all(torch.isfinite(v) for v in losses.values())
    # Terms recomputed by hand.
    torch.testing.assert_close(losses["expr"], F.mse_loss(out["expr"], batch["expr"]))
    torch.testing.assert_close(losses["cell_type"], F.cross_entropy(out["cell_logits"], batch["cell_type"]))
    in_a = torch.tensor([True, True, False, True, True, False])
    spec = F.mse_loss(out["group_expr"]["a"][in_a], batch["expr"][in_a]) + F.mse_loss(
        out["group_expr"]["b"][~in_a], batch["expr"][~in_a]
    )
    torch.testing.assert_close(losses["specialist"], spec)
    net.eval()  # dropout would differ between calls; recompute both sides in eval mode
    out_eval = forward(net, batch)
    losses_eval = ghist_losses(out_eval, batch, net)
    feats_p, logits_p = net.expr_to_type(out_eval["expr"])
    feats_t, logits_t = net.expr_to_type(batch["expr"])
    torch.testing.assert_close(losses_eval["expr_cosine"], (1 - F.cosine_similarity(feats_p, feats_t)).mean())
    torch.testing.assert_close(losses_eval["expr_logits"], F.mse_loss(logits_p, logits_t))
    torch.testing.assert_close(losses_eval["expr_type"], F.cross_entropy(logits_p, batch["cell_type"]))
    true_comp = torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]])
    kl = (true_comp * (true_comp.clamp(min=1e-12).log() - out_eval["composition"].log())).sum(1).mean()
    torch.testing.assert_close(losses_eval["composition"], kl, atol=1e-5, rtol=1e-4)
    losses["total"].backward()
    check_grads(net)


def test_weights_override_and_unknown_weight():
    net = make_net()
    batch = make_batch()
    out = forward(net, batch)
    only_expr = {k: 0.0 for k in DEFAULT_LOSS_WEIGHTS} | {"expr": 2.0}
    losses = ghist_losses(out, batch, net, weights=only_expr)
    torch.testing.assert_close(losses["total"], 2 * losses["expr"])
    with pytest.raises(KeyError, match="pixl"):
        ghist_losses(out, batch, net, weights={"pixl": 1.0})


def test_gene_pearson_loss():
    gen = torch.Generator().manual_seed(1)
    true = torch.rand(40, 5, generator=gen) * 4
    assert float(gene_pearson_loss(true, true)) == pytest.approx(0.0, abs=1e-5)
    # a gene's level and scale do not count, only how its cells rank: 1 - r for each gene, averaged
    assert float(gene_pearson_loss(3 * true + 7, true)) == pytest.approx(0.0, abs=1e-5)
    assert float(gene_pearson_loss(-true, true)) == pytest.approx(2.0, abs=1e-5)
    noisy = true + torch.rand(40, 5, generator=gen) * 4
    r = [np.corrcoef(noisy[:, g].numpy(), true[:, g].numpy())[0, 1] for g in range(5)]
    assert float(gene_pearson_loss(noisy, true)) == pytest.approx(1 - np.mean(r), abs=1e-5)
    # every gene weighs the same: a gene measured 100 times larger does not dominate, unlike the MSE
    scaled = true.clone()
    scaled[:, 0] *= 100
    assert float(gene_pearson_loss(noisy * torch.tensor([100.0, 1, 1, 1, 1]), scaled)) == pytest.approx(
        1 - np.mean(r), abs=1e-5
    )
    # a gene measured constant is left out; fewer than 3 cells or nothing varying: no term
    constant = true.clone()
    constant[:, 2] = 1.0
    assert float(gene_pearson_loss(noisy, constant)) == pytest.approx(1 - np.mean(np.delete(r, 2)), abs=1e-5)
    assert gene_pearson_loss(true[:2], true[:2]) is None
    assert gene_pearson_loss(true, torch.ones_like(true)) is None
    # a gene predicted constant (nothing learnt yet) gives a finite gradient towards the measured order
    pred = torch.zeros(40, 5, requires_grad=True)
    gene_pearson_loss(pred, true).backward()
    assert torch.isfinite(pred.grad).all()
    assert all(np.corrcoef(-pred.grad[:, g].numpy(), true[:, g].numpy())[0, 1] > 0.99 for g in range(5))


def test_pearson_term_only_when_weighted():
    net = make_net().eval()  # the expression-to-type head's dropout would differ between the two calls
    batch = make_batch()
    out = forward(net, batch)
    assert "expr_pearson" not in ghist_losses(out, batch, net)  # weight 0 by default: not computed
    losses = ghist_losses(out, batch, net, weights={"expr_pearson": 2.0})
    torch.testing.assert_close(losses["expr_pearson"], gene_pearson_loss(out["expr"], batch["expr"]))
    without = ghist_losses(out, batch, net)
    torch.testing.assert_close(losses["total"], without["total"] + 2.0 * losses["expr_pearson"])


def test_cells_without_type_drop_typed_terms():
    net = make_net(groups={"a": [0]})
    batch = make_batch()
    batch["cell_type"] = torch.full((6,), -1)
    out = forward(net, batch)
    losses = ghist_losses(out, batch, net)
    assert set(losses) == {"pixel", "expr", "expr_cosine", "expr_logits", "total"}
    # Unknown-type nuclei are ignored by the pixel loss: only background pixels count.
    target = pixel_targets(batch["labels"], batch["cell_type"], 3)
    assert set(target.unique().tolist()) == {-100, 0}
    losses["total"].backward()
    check_grads(net)
    assert grad_norm(net.type_head) == 0.0
    assert grad_norm(net.group_heads) == 0.0


def test_some_cells_without_type_and_tiles_without_typed_cells():
    net = make_net(groups={"a": [0, 1]})
    batch = make_batch()
    batch["cell_type"] = torch.tensor([0, -1, -1, -1, 1, 2])  # tile 1 has no typed cell
    out = forward(net, batch)
    losses = ghist_losses(out, batch, net)
    assert set(losses) >= TYPED_TERMS
    known = batch["cell_type"] >= 0
    torch.testing.assert_close(
        losses["cell_type"], F.cross_entropy(out["cell_logits"][known], batch["cell_type"][known])
    )
    true_comp, typed = tile_composition(batch["cell_type"], batch["cell_batch"], 3, 3)
    assert typed.tolist() == [1, 0, 2]
    valid = typed > 0
    log_q = torch.log_softmax(out["composition_logits"], 1)[valid]
    expected = F.kl_div(log_q, true_comp[valid], reduction="sum") / 2
    torch.testing.assert_close(losses["composition"], expected)
    # Specialist only on cells of the group with a known type: cells 0 (type 0) and 4 (type 1).
    sel = torch.tensor([True, False, False, False, True, False])
    torch.testing.assert_close(losses["specialist"], F.mse_loss(out["group_expr"]["a"][sel], batch["expr"][sel]))
    losses["total"].backward()
    check_grads(net)


def test_nan_expression_rows_are_dropped():
    net = make_net(groups={"a": [0, 1, 2]})
    batch = make_batch()
    batch["expr"][[1, 4]] = float("nan")
    batch["expr"][2, 3] = float("nan")  # a partly measured row is dropped too
    out = forward(net, batch)
    out["expr"].retain_grad()
    losses = ghist_losses(out, batch, net)
    measured = torch.tensor([True, False, False, True, False, True])
    torch.testing.assert_close(losses["expr"], F.mse_loss(out["expr"][measured], batch["expr"][measured]))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    check_grads(net)
    assert torch.isfinite(out["expr"].grad).all()


def test_no_measured_expression_drops_expression_terms():
    net = make_net(groups={"a": [0]})
    batch = make_batch()
    batch["expr"] = torch.full((6, 6), float("nan"))
    out = forward(net, batch)
    losses = ghist_losses(out, batch, net)
    assert set(losses) == {"pixel", "cell_type", "expr_type", "composition", "type_composition", "total"}
    losses["total"].backward()
    check_grads(net)
    assert grad_norm(net.group_heads) == 0.0
    # Batches without an "expr" entry behave the same.
    del batch["expr"]
    assert set(ghist_losses(forward(net, batch), batch, net)) == set(losses)


def test_no_groups_no_specialist_term():
    net = make_net(groups=None)
    batch = make_batch()
    losses = ghist_losses(forward(net, batch), batch, net)
    assert "specialist" not in losses
    assert ALL_TERMS - {"specialist"} <= set(losses)


def test_network_without_types():
    net = make_net(n_types=0, reference=False)
    batch = make_batch(n_types=0)
    out = forward(net, batch)
    losses = ghist_losses(out, batch, net)
    assert set(losses) == {"pixel", "expr", "total"}
    target = pixel_targets(batch["labels"], batch["cell_type"], 0)
    assert set(target.unique().tolist()) == {-100, 0, 1}
    torch.testing.assert_close(losses["pixel"], F.cross_entropy(out["pixel_logits"], target, ignore_index=-100))
    # Types present in the batch are ignored by a network without types.
    batch["cell_type"] = torch.tensor([0, 1, 2, 0, 1, 2])
    assert set(ghist_losses(out, batch, net)) == {"pixel", "expr", "total"}
    losses["total"].backward()
    check_grads(net)


def test_nothing_to_learn_gives_zero_total_with_zero_gradients():
    net = make_net()
    batch = make_batch()
    batch["labels"] = torch.full_like(batch["labels"], -1)
    batch["cell_type"] = torch.full((6,), -1)
    batch["expr"] = torch.full((6, 6), float("nan"))
    out = forward(net, batch)
    losses = ghist_losses(out, batch, net)
    assert set(losses) == {"total"}
    assert float(losses["total"].detach()) == 0.0
    losses["total"].backward()
    assert grad_norm(net) == 0.0


def test_pixel_targets():
    labels = torch.tensor([[[0, 1, 2], [3, -1, 0]]])
    target = pixel_targets(labels, torch.tensor([2, -1, 0]), 3)
    assert target.tolist() == [[[0, 3, -100], [1, -100, 0]]]
    assert pixel_targets(labels, None, 3).tolist() == [[[0, -100, -100], [-100, -100, 0]]]
    assert pixel_targets(labels, None, 0, ignore_index=-1).tolist() == [[[0, 1, 1], [1, -1, 0]]]
    with pytest.raises(ValueError, match="nucleus id 3"):
        pixel_targets(labels, torch.tensor([0, 1]), 3)


def test_spot_loss():
    scale = 5.0
    counts = torch.tensor([[1.0, 0.0], [2.0, 4.0], [7.0, 7.0], [1.0, 1.0]])
    pred = (scale * torch.log1p(counts)).requires_grad_()
    cell_spot = torch.tensor([0, 0, -1, 2])  # cell 2 outside every spot, spot 1 without cells
    spot_expr = torch.tensor([[3.0, 4.0], [9.0, 9.0], [2.0, 0.0]])
    loss = spot_loss(pred, cell_spot, spot_expr, scale)
    # Spot 0 matches exactly; spot 2 predicts (1, 1) against (2, 0).
    expected = (scale**2) * ((math.log(2) - math.log(3)) ** 2 + (math.log(2) - math.log(1)) ** 2) / 4
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[2] == 0)
    spot_expr[2] = float("nan")
    torch.testing.assert_close(spot_loss(pred, cell_spot, spot_expr, scale), torch.tensor(0.0))
    assert spot_loss(pred, torch.full((4,), -1), spot_expr, scale) is None


def test_spot_sums_are_the_one_spot_comparison():
    """Loss and validation score share one sum: negative predictions add nothing, huge ones stay finite."""
    from ghist._model._module import spot_pairs

    scale = 5.0
    pred = torch.tensor([[scale * math.log(3.0), -4.0], [scale * math.log(2.0), 1e4], [1.0, 1.0]])
    cell_spot = torch.tensor([0, 0, 1])
    spot_expr = torch.tensor([[4.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]])
    sums, keep = spot_sums(pred, cell_spot, spot_expr, scale)
    assert keep.tolist() == [True, False, False]  # spot 1 unmeasured, spot 2 without cells
    torch.testing.assert_close(sums[0, 0], torch.tensor(3.0))  # 2 + 1 counts
    assert torch.isfinite(sums).all()
    assert float(sums[0, 1]) == pytest.approx(math.expm1(30.0), rel=1e-5)  # -4 clamped to 0, 1e4 to 30
    pred_log, true_log = spot_pairs(pred, cell_spot, spot_expr, scale)
    np.testing.assert_allclose(pred_log, torch.log1p(sums[keep]).numpy())
    np.testing.assert_allclose(true_log, torch.log1p(spot_expr[keep]).numpy())
    loss = spot_loss(pred, cell_spot, spot_expr, scale)
    expected = scale**2 * ((torch.log1p(sums[0]) - torch.log1p(spot_expr[0])) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_spot_term_in_ghist_losses():
    net = make_net()
    batch = make_batch()
    batch["expr"] = torch.full((6, 6), float("nan"))  # spot-level data only
    batch["cell_spot"] = torch.tensor([0, 0, 1, 1, -1, -1])
    batch["spot_expr"] = torch.rand(2, 6) * 5
    out = forward(net, batch)
    losses = ghist_losses(out, batch, net)
    assert "spot" in losses
    assert "expr" not in losses
    torch.testing.assert_close(losses["spot"], spot_loss(out["expr"], batch["cell_spot"], batch["spot_expr"], 5.0))
    losses["total"].backward()
    check_grads(net)
    assert grad_norm(net.expr_head) > 0
