import pytest
import torch

from slmquant import calib
from slmquant.arch import ARCH_MAPS, arch_map, decoder_layers, heads, layer_linears
from slmquant.models import SUPPORTED_ARCHS, tiny_model


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_layer_by_layer_equals_the_full_forward(arch):
    model, _ = tiny_model(arch, seed=1)
    windows = torch.randint(0, 1000, (3, 24))
    with torch.no_grad():
        full = model(windows, output_hidden_states=True).hidden_states   # embeddings, then each layer
    seen = []
    calib.walk_layers(model, windows, lambda i, layer, x, kw: seen.append(torch.cat(x)))
    assert len(seen) == model.config.num_hidden_layers
    for i, x in enumerate(seen):
        assert torch.allclose(x, full[i], atol=1e-5), i


def test_walk_layers_feeds_quantized_outputs_forward():
    model, _ = tiny_model("llama", seed=2)
    windows = torch.randint(0, 1000, (2, 16))
    seen = []

    def fn(i, layer, x, kw):
        seen.append(torch.cat(x))
        if i == 0:       # change layer 0 in place: layer 1 must see its new output
            layer.mlp.down_proj.weight.data.zero_()
    calib.walk_layers(model, windows, fn)
    with torch.no_grad():
        ref = model(windows, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(seen[1], ref, atol=1e-5)


def test_act_absmax_and_hessian_hooks():
    model, _ = tiny_model("qwen2", seed=0)
    layer = decoder_layers(model)[0]
    stats, hess = {}, {}
    targets = {"q": layer.self_attn.q_proj, "down": layer.mlp.down_proj}
    inputs = {}

    def collect(name, x):
        calib.act_absmax(stats, name, x)
        hess.setdefault(name, calib.make_hessian(x.shape[-1]))
        calib.accumulate_hessian(hess[name], x)
        inputs.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).clone())
    with calib.input_hooks(targets, collect):
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, 10)))
            model(torch.randint(0, 1000, (1, 7)))
    for name in targets:
        X = torch.cat(inputs[name])
        assert torch.allclose(stats[name], X.abs().amax(0))
        assert hess[name]["count"] == 17
        assert torch.allclose(hess[name]["H"], 2 * X.T @ X / 17, atol=1e-5)


def test_arch_maps_describe_the_real_modules():
    for arch in SUPPORTED_ARCHS:
        model, _ = tiny_model(arch)
        amap = arch_map(model)
        layer = decoder_layers(model)[0]
        for b in (amap.attn_in, amap.mlp_in, amap.v_o, amap.up_down):
            layer.get_submodule(b.prev)
            for n in b.linears:
                assert isinstance(layer.get_submodule(n), torch.nn.Linear)
        for n in amap.output_norms + amap.qk_norms:
            layer.get_submodule(n)
        assert (layer.self_attn.q_proj.bias is not None) == amap.qkv_bias
        assert len(layer_linears(model)) == 7 * model.config.num_hidden_layers
        assert heads(model) == (4, 2, 16)
    assert ARCH_MAPS["gemma3_text"].norm_offset == 1.0 and ARCH_MAPS["gemma3_text"].mlp_in.prev == "pre_feedforward_layernorm"
