"""The rotation toolkit (slmquant/rotation.py): Hadamard matrices of every order the models need,
orthogonal starts, the fast transform, and the model surgery (untie, fuse norms, R1, R2 with GQA
and Qwen2's v bias, R4 online + offline) that must leave the float model's logits unchanged."""
import copy

import pytest
import torch

from slmquant import rotation as rot
from slmquant.arch import arch_map, decoder_layers, heads
from slmquant.errors import SlmquantError
from slmquant.models import tiny_model
from slmquant.quant import QLinear

pytestmark = [pytest.mark.spinquant, pytest.mark.w8a8, pytest.mark.w4a8, pytest.mark.w4a16]

# the orders the two bundled models need: hidden, head_dim, MLP width (SmolLM2, Qwen2.5-0.5B)
MODEL_ORDERS = {576: (36, 16), 64: (1, 64), 1536: (12, 128), 896: (28, 32), 4864: (76, 64)}


@pytest.mark.parametrize("k", [2, 4, 12, 20, 28, 36, 44, 60, 76, 108])
def test_small_orders_are_hadamard(k):
    H = rot.hadamard(k)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, k * torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("n", sorted(MODEL_ORDERS))
def test_model_orders_factor_and_the_fast_transform_is_the_matrix(n):
    assert rot.factor(n) == MODEL_ORDERS[n]
    k, p = MODEL_ORDERS[n]
    H = rot.hadamard(n)
    assert torch.equal(H, torch.kron(rot.hadamard(k) if k > 1 else torch.ones(1, 1, dtype=torch.float64),
                                     rot.hadamard(p)))           # orthogonal: a product of Hadamard factors
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(rot.fht(x), x @ H.T / n ** 0.5, atol=1e-12)
    assert torch.allclose(rot.fht(x).norm(dim=-1), x.norm(dim=-1))
    assert rot.fht(x.float()).dtype == torch.float32


def test_orders_without_a_construction_are_refused():
    with pytest.raises(SlmquantError, match="no Hadamard matrix of order 70"):
        rot.factor(70)


def test_random_starts_are_orthogonal_and_seeded():
    g = lambda: torch.Generator().manual_seed(3)
    for make in (rot.random_hadamard, rot.random_orthogonal):
        R = make(96, g())
        assert rot.orthogonality_error(R) < 1e-12 and torch.equal(R, make(96, g()))
    assert not torch.equal(rot.random_hadamard(96, g()), rot.random_hadamard(96))


def _rotate(model, seed: int = 0, keep_v_bias: bool = False):
    """Untie, fuse norms, R1, R2 per layer, R4 (offline + online): in place."""
    g = torch.Generator().manual_seed(seed)
    amap, (_, _, hd) = arch_map(model), heads(model)
    rot.untie_embeddings_(model)
    rot.fuse_norms_(model)
    rot.rotate_residual_(model, rot.random_hadamard(model.config.hidden_size, g))
    for layer in decoder_layers(model):
        v = layer.get_submodule(amap.v_o.prev)
        b = v.bias.detach().clone() if v.bias is not None else None
        rot.rotate_heads_(model, layer, rot.random_hadamard(hd, g))
        if keep_v_bias and b is not None:
            with torch.no_grad():
                v.bias.copy_(b)                        # the reference code's defect: v bias left unrotated
        down = layer.get_submodule(amap.up_down.linears[0])
        rot.rotate_down_input_(down)
        online = QLinear.from_linear(down, None, None)         # float weights, input rotated online
        online.had = down.in_features
        layer.set_submodule(amap.up_down.linears[0], online)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_untie_fuse_and_rotate_keep_the_float_logits(arch):
    model, _ = tiny_model(arch, seed=2, dtype=torch.float64)
    ids = torch.randint(0, 5000, (2, 24))
    emb0 = model.get_submodule(arch_map(model).embed).weight.detach().clone()
    with torch.no_grad():
        ref = model(ids).logits
        out = _rotate(copy.deepcopy(model))(ids).logits
    # llama's and qwen2's RMSNorm compute in float32 even in a float64 model, and x R1 rounds
    # differently from x there: 1.6e-7 of the logit range measured (a wrong rotation: order 1)
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()
    rotated = _rotate(copy.deepcopy(model))
    amap = arch_map(rotated)
    emb, head = rotated.get_submodule(amap.embed).weight, rotated.get_submodule(amap.lm_head).weight
    assert emb.data_ptr() != head.data_ptr() and not rotated.config.tie_word_embeddings
    # the embedding rotated once (not also scaled by the final norm, not rotated twice through the head)
    R1 = rot.random_hadamard(model.config.hidden_size, torch.Generator().manual_seed(0))
    assert torch.allclose(emb, emb0 @ R1, atol=1e-12)
    if arch == "qwen2":                                # the v bias must turn with R2
        with torch.no_grad():
            bad = _rotate(copy.deepcopy(model), keep_v_bias=True)(ids).logits
        assert (bad - ref).abs().max() > 1e-3 * ref.abs().max()


def test_a_tied_embedding_is_never_rotated():
    model, _ = tiny_model("llama")
    with pytest.raises(SlmquantError, match="untie the embeddings first"):
        rot.rotate_residual_(model, rot.random_hadamard(model.config.hidden_size))


def test_gemma3_is_refused_with_the_reason():
    model, _ = tiny_model("gemma3_text")
    with pytest.raises(SlmquantError, match="post-attention and post-feedforward norms"):
        rot.fuse_norms_(model)


@pytest.mark.parametrize("alias", [pytest.param("smollm2-135m", marks=pytest.mark.smollm2),
                                   pytest.param("qwen2.5-0.5b", marks=[pytest.mark.qwen2, pytest.mark.slow])])
def test_rotation_keeps_the_whole_bundled_model(alias, float_models):
    """The same surgery on the real models in float32 (the rotations computed in float64), one
    window of 128 WikiText-2 tokens: SmolLM2's hidden states reach the hundreds, Qwen's MLP needs the
    order-76 Hadamard."""
    from slmquant import evaluate
    model, tok = float_models(alias)
    ids = evaluate.wikitext2_tokens(tok)[:128][None].to(next(model.parameters()).device)
    with torch.no_grad():
        ref = model(ids).logits
        out = _rotate(copy.deepcopy(model).float())(ids).logits
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err < 1e-4, err
