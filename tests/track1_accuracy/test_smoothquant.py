"""SmoothQuant's equivalent transformation leaves the float model's output unchanged (float64),
on every architecture: GQA (4 query / 2 kv heads), Qwen2's q/k/v biases, Gemma's (1 + w) norms."""
import pytest
import torch

from slmquant.methods import make_config, quantize
from slmquant.methods.smoothquant import collect_act_max, smooth_, smoothing_scales
from slmquant.models import SUPPORTED_ARCHS, tiny_model

# SmoothQuant's equivalence tests guard every SmoothQuant cell: selected by `-m <bits>` and by the method's marker
pytestmark = [pytest.mark.smoothquant, pytest.mark.w8a8, pytest.mark.w4a8, pytest.mark.w4a16]


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_keeps_the_float_output(arch, alpha):
    model, _ = tiny_model(arch, seed=4, dtype=torch.float64)
    calib = torch.randint(0, 5000, (4, 32))
    ids = torch.randint(0, 5000, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        act = collect_act_max(model, calib)
        before = model.model.layers[0].self_attn.v_proj.weight.clone()
        smooth_(model, act, alpha)
        out = model(ids).logits
    assert not torch.equal(before, model.model.layers[0].self_attn.v_proj.weight)   # it did something
    if arch == "gemma3_text":
        # transformers' Gemma3RMSNorm computes x.float() (float32) even in a float64 model: the
        # float model itself is only float32-exact there (measured 4e-7 of the logit range).
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    else:
        assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9)


def test_scales_formula():
    s = smoothing_scales(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 4.0]), 0.5)
    assert s.tolist() == [2.0, 0.5]


def test_smoothing_flattens_outlier_channels():
    """The point of the method: after smoothing, the per-channel max of the q/gate inputs is flatter."""
    model, _ = tiny_model("llama", seed=5)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 40.0          # an outlier channel
    calib = torch.randint(0, 5000, (4, 32))
    before = collect_act_max(model, calib)["0.self_attn.q_proj"]
    smooth_(model, collect_act_max(model, calib), 0.5)
    after = collect_act_max(model, calib)["0.self_attn.q_proj"]
    assert after.max() / after.median() < before.max() / before.median()


def test_smoothquant_is_smoothing_then_rtn_end_to_end():
    """The registered method equals its two steps done by hand (smooth with the calibration maxima,
    then round-to-nearest), and differs from RTN alone: the smoothing reached the quantized model."""
    import copy

    from slmquant.methods.rtn import rtn
    model, tok = tiny_model("qwen2", seed=0)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] += 20.0           # an outlier channel
    calib = torch.randint(0, 5000, (2, 16))
    cfg = make_config("smoothquant", "w8a8", {"calib_samples": 2, "calib_seqlen": 16})
    sq = quantize(copy.deepcopy(model), "smoothquant", cfg, calib=calib)
    ref = copy.deepcopy(model)
    smooth_(ref, collect_act_max(ref, calib, progress=False), cfg.alpha)
    rtn(ref, None, cfg)
    plain = quantize(copy.deepcopy(model), "rtn", make_config("rtn", "w8a8"))
    ids = torch.randint(0, 5000, (1, 24))
    with torch.no_grad():
        out = sq(ids).logits
        assert torch.equal(out, ref(ids).logits)
        assert not torch.allclose(out, plain(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_alpha_search_scores_every_alpha_of_every_layer(arch):
    """The search measures a real layer error for each alpha of the grid on each layer (they differ),
    and quantizes the layers as it walks them."""
    from slmquant.methods.smoothquant import ALPHA_GRID, search_alpha_
    model, _ = tiny_model(arch, seed=3)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] += 30.0          # an outlier channel
    calib = torch.randint(0, 5000, (4, 32))
    cfg = make_config("smoothquant", "w4a8", {"alpha_search": True, "calib_samples": 4, "calib_seqlen": 32})
    errors = search_alpha_(model, calib, collect_act_max(model, calib), cfg)
    assert set(errors) == set(range(len(model.model.layers))) and set(errors[0]) == set(ALPHA_GRID)
    assert len({round(e, 6) for e in errors[0].values()}) > 1               # alpha matters
    assert "W=int4" in repr(model.model.layers[0].self_attn.q_proj)          # quantized in the walk


def test_smoothquant_with_gptq_weights_and_search_records_alphas():
    model, _ = tiny_model("llama", seed=1)
    cfg = make_config("smoothquant", "w4a8", {"calib_samples": 2, "calib_seqlen": 16, "alpha_search": True,
                                              "weights": "gptq"})
    quantize(model, "smoothquant", cfg, calib=torch.randint(0, 5000, (2, 16)))
    assert set(model.slmquant_method_info["alpha"]) == {0, 1}
    assert "A=int8/sym/token" in repr(model.model.layers[1].mlp.down_proj)
