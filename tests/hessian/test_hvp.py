"""Block Hessian-vector products: exact on a quadratic, finite differences on a tiny BERT (float64), and the
eager-attention / eval / requires_grad switches restored afterwards."""

from __future__ import annotations

import pytest
import torch

from qbert.hessian import BlockHVP, eager_attention, hessian_mode, hutchinson_traces, hvp, module_weights
from tests.hessian._quadratic import Quadratic, quadratic_loss, spd_matrix
from tests.nn import _tiny_models as T

FD_STEP = 1e-4  # central differences of float64 gradients: error ~ step^2 * third derivative
FD_REL_TOL = 1e-5
LAYER = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def quadratic():
    return Quadratic(spd_matrix(12 + 10), (3, 4), (2, 5))


def _classifier_batch():
    return dict(T.inputs(), labels=torch.tensor([0, 1]))


def _task_loss(model, batch):
    return model(**batch).loss


def test_hvp_is_the_matrix_product(quadratic):
    v = [torch.randn(3, 4), torch.randn(2, 5)]
    products = hvp(quadratic.loss(), [quadratic.a.weight, quadratic.b.weight], v)
    expected = quadratic.matrix @ torch.cat([t.flatten() for t in v])
    assert torch.allclose(torch.cat([p.flatten() for p in products]), expected, rtol=1e-5, atol=1e-5)


def test_block_products_leave_out_the_cross_blocks_unless_joint(quadratic):
    weights = module_weights(quadratic, ["a", "b"])
    v = {"a": torch.randn(3, 4), "b": torch.randn(2, 5)}
    s = quadratic.split
    full = quadratic.matrix @ torch.cat([v["a"].flatten(), v["b"].flatten()])
    with hessian_mode(quadratic, weights.values()):
        block = BlockHVP(quadratic, weights, [{}], quadratic_loss)(v)
        joint = BlockHVP(quadratic, weights, [{}], quadratic_loss, joint=True)(v)
    assert torch.allclose(block["a"].flatten(), quadratic.matrix[:s, :s] @ v["a"].flatten(), atol=1e-5)
    assert torch.allclose(joint["a"].flatten(), full[:s], atol=1e-5)
    assert torch.allclose(joint["b"].flatten(), full[s:], atol=1e-5)


def test_tiny_bert_block_product_matches_finite_differences():
    model = T.build("BertForSequenceClassification").double()
    weights = module_weights(model, [LAYER])
    weight = weights[LAYER]
    batch = _classifier_batch()
    v = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with hessian_mode(model, weights.values()):
        product = BlockHVP(model, weights, [batch], _task_loss)({LAYER: v})[LAYER]

        def grad_at(w):
            with torch.no_grad():
                weight.copy_(w)
            return torch.autograd.grad(_task_loss(model, batch), weight)[0]

        w0 = weight.detach().clone()
        finite = (grad_at(w0 + FD_STEP * v) - grad_at(w0 - FD_STEP * v)) / (2 * FD_STEP)
        grad_at(w0)
    # BlockHVP accumulates in float32; compare at float32 precision.
    assert torch.allclose(product.double(), finite, rtol=FD_REL_TOL, atol=FD_REL_TOL * finite.abs().max().item())


def test_eager_attention_is_set_and_restored():
    model = T.build("BertForSequenceClassification")
    assert model.config._attn_implementation == "sdpa"
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"), eager_attention(model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_hessian_tools_restore_the_model_state():
    model = T.build("BertForSequenceClassification").train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    hutchinson_traces(model, [LAYER], [_classifier_batch()], _task_loss, probes=2, progress=False)
    assert model.training and model.config._attn_implementation == "sdpa"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_a_module_the_loss_ignores_is_an_error(quadratic):
    def only_a(model, batch):
        w = model.a.weight.flatten()
        return w @ w

    with pytest.raises(ValueError, match="does not depend on the weight of module 'b'"):
        hutchinson_traces(quadratic, ["a", "b"], [{}], only_a, probes=2, progress=False)


def test_a_shared_weight_listed_twice_is_an_error():
    model = T.build("AlbertModel")
    layer = "encoder.albert_layer_groups.0.albert_layers.0.attention.query"
    model.alias = model.get_submodule(layer)
    with pytest.raises(ValueError, match=f"'{layer}' and 'alias' share one weight"):
        module_weights(model, [layer, "alias"])
