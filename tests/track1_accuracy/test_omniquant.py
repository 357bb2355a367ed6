"""OmniQuant: the LET fold is an exact equivalence (float64, every architecture: GQA 4 query / 2 kv
heads, Qwen2's q/k/v biases, Gemma's (1 + w) norms), the trained block is the block that gets
deployed, a non-finite step falls back instead of spreading NaN, and an interrupted build resumes."""
import copy

import pytest
import torch
from torch.func import functional_call

from slmquant import attn
from slmquant.arch import arch_map, decoder_layers, heads
from slmquant.calib import capture_layer_inputs
from slmquant.methods import make_config, quantize
from slmquant.methods import omniquant as oq
from slmquant.models import SUPPORTED_ARCHS, tiny_model

pytestmark = [pytest.mark.omniquant, pytest.mark.w8a8, pytest.mark.w4a8, pytest.mark.w4a16]

TINY = {"calib_samples": 2, "calib_seqlen": 32}


def _blocks(model, calib, cfg, perturb: float, seed: int = 0):
    """(layer, Block, float inputs, kwargs) per layer, the float stream walked layer by layer; LET
    scales multiplied by exp(perturb * N(0, 1)) (0: the reference's initial values)."""
    amap, hq = arch_map(model), heads(model)
    state = capture_layer_inputs(model, calib)
    x, g = state.hidden, torch.Generator().manual_seed(seed)
    for i, layer in enumerate(decoder_layers(model)):
        kw = state.layer_kwargs[i]
        out, act_max = oq.float_pass(layer, amap, x, kw)
        blk = oq.Block(layer, act_max, cfg, amap, hq)
        with torch.no_grad():
            for s in blk.let.values():
                s.mul_(torch.exp(perturb * torch.randn(s.shape, generator=g, dtype=s.dtype)))
        yield layer, blk, x, kw
        x = out


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
@pytest.mark.parametrize("perturb", [0.0, 0.5])
@pytest.mark.parametrize("let_down", [False, True])
def test_let_fold_keeps_the_float_output(arch, perturb, let_down):
    model, _ = tiny_model(arch, seed=3, dtype=torch.float64)
    calib, ids = torch.randint(0, 5000, (2, 24)), torch.randint(0, 5000, (2, 20))
    cfg = make_config("omniquant", "w4a8", {**TINY, "let_down": let_down})
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        ref = model(ids).logits
        v0, down0 = model.model.layers[0].self_attn.v_proj.weight.clone(), mlp.down_proj.weight.clone()
    for layer, blk, _, _ in list(_blocks(model, calib, cfg, perturb)):
        n_q, n_kv, hd = heads(model)
        assert blk.let["v_o"].shape == (n_kv * hd,)                  # one factor per kv channel
        assert ("up_down" in blk.let) == let_down
        oq.fold_block_(layer, blk, cfg, quantize=False)
    with torch.no_grad():
        out = model(ids).logits
    assert not torch.equal(v0, model.model.layers[0].self_attn.v_proj.weight)        # it did something
    assert torch.equal(down0, mlp.down_proj.weight) != let_down                      # down scaled iff let_down (up undoes it: logits below)
    # Gemma3RMSNorm computes in float32 even in a float64 model (see test_smoothquant.py)
    tol = 1e-5 * ref.abs().max() if arch == "gemma3_text" else 1e-9
    assert (out - ref).abs().max() <= tol


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
@pytest.mark.parametrize("bits", ["w4a8", "w4a16", "w8a8", "w4a8-quant_attn", "w4a8-let_down"])
def test_trained_block_is_the_folded_block(arch, bits):
    """The training forward (functional weights, straight-through activation rounding in hooks;
    with quant_attn, the attention inputs rounded straight-through) and the folded block (QLinears)
    compute the same function after training."""
    model, _ = tiny_model(arch, seed=5)
    calib = torch.randint(0, 5000, (2, 32))
    bits, _, opt = bits.partition("-")
    qa = opt == "quant_attn"
    cfg = make_config("omniquant", bits, {**TINY, "epochs": 3, **({opt: True} if opt else {})})
    layer, blk, x, kw = next(_blocks(model, calib, cfg, 0.0))
    target, _ = oq.float_pass(layer, arch_map(model), x, kw)
    if qa:
        attn.install(model, layer.self_attn, cfg.a_spec)
    res = oq.train_block(layer, blk, x, kw, target, cfg)
    assert len(res["loss"]) == 3 and not res["nonfinite"]
    hooks = oq._act_quant_hooks(layer, blk.amap, cfg.a_spec)
    with torch.no_grad():
        trained = functional_call(layer, blk.weights(), (x[0],), kw)
    for h in hooks:
        h.remove()
    folded = copy.deepcopy(layer)
    oq.fold_block_(folded, blk, cfg)
    with torch.no_grad():
        out = folded(x[0], **kw)
    assert torch.allclose(out, trained, rtol=1e-5, atol=1e-6 * trained.abs().max())


def test_lwc_starts_at_the_reference_clip_and_learns():
    model, _ = tiny_model("llama", seed=1)
    cfg = make_config("omniquant", "w4a16", {**TINY, "epochs": 4})
    layer, blk, x, kw = next(_blocks(model, torch.randint(0, 5000, (2, 32)), cfg, 0.0))
    assert not blk.let                                           # W4A16: LWC only (reference)
    gamma = blk.lwc["mlp.down_proj"][0]
    assert torch.allclose(torch.sigmoid(gamma), torch.tensor(0.98201), atol=1e-5)
    target, _ = oq.float_pass(layer, arch_map(model), x, kw)
    res = oq.train_block(layer, blk, x, kw, target, cfg)
    assert not torch.allclose(blk.lwc["mlp.down_proj"][0], gamma.detach().new_full(gamma.shape, oq.LWC_INIT))
    assert res["loss"][-1] < res["loss"][0]


def test_a_block_keeps_every_tensor_on_its_layer_device():
    """LET scales and LWC logits live where the layer's weights do (a CUDA model trains on CUDA);
    checked on the meta device, which any CPU-created tensor would not match."""
    model, _ = tiny_model("qwen2", seed=1)
    cfg = make_config("omniquant", "w4a8", TINY)
    layer, blk, x, kw = next(_blocks(model, torch.randint(0, 5000, (2, 32)), cfg, 0.0))
    _, act_max = oq.float_pass(layer, arch_map(model), x, kw)
    layer = layer.to("meta")
    blk = oq.Block(layer, {n: a.to("meta") for n, a in act_max.items()}, cfg, arch_map(model), heads(model))
    assert blk.let and blk.lwc
    assert {t.device.type for t in blk.params()} == {"meta"}
    assert {t.device.type for t in blk.weights().values()} == {"meta"}


def test_aug_loss_targets_the_float_block_on_the_quantized_stream(monkeypatch, tmp_path):
    """aug_loss adds the MSE to the float block run on the quantized block's own inputs. At block 0
    those inputs are the float ones, so the loss is twice the plain loss (AdamW is invariant to the
    loss's scale up to its eps); from block 1 on the quantized stream has drifted and it is not."""
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    model, _ = tiny_model("qwen2", seed=4)
    calib = torch.randint(0, 5000, (2, 32))
    loss = {aug: quantize(copy.deepcopy(model), "omniquant", make_config(
        "omniquant", "w4a8", {**TINY, "epochs": 1, "aug_loss": aug}), calib).slmquant_method_info["loss"]
        for aug in (False, True)}
    ratio = [torch.tensor(loss[True][i]) / torch.tensor(loss[False][i]) for i in (0, 1)]
    assert torch.allclose(ratio[0], torch.tensor(2.0), rtol=1e-3)
    assert (ratio[1] - 2).abs().min() > 1e-2


def test_token_loss_weighs_every_position_alike(monkeypatch, tmp_path):
    """loss="token": each position's squared error over its target's mean square, averaged over
    positions (hand-computed here), so a position a thousand times larger than the rest (a massive
    activation) weighs as much as any other, where the plain MSE is all that position. The setting
    reaches the training loop."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    y[:, 0] *= 1000                                                     # massive first positions
    out = y + 0.01 * torch.randn(y.shape, generator=g, dtype=torch.float64) * y.abs()
    hand = sum(((out[b, t] - y[b, t]) ** 2).sum() / (y[b, t] ** 2).sum() for b in range(2) for t in range(5)) / 10
    assert torch.allclose(oq.token_mse(out, y), hand, rtol=1e-12)
    first = torch.nn.functional.mse_loss(out[:, :1], y[:, :1]) / 5      # the MSE's share of position 0
    assert first / torch.nn.functional.mse_loss(out, y) > 0.999                 # (the premise)
    assert oq.token_mse(out[:, :1], y[:, :1]) / 5 / oq.token_mse(out, y) < 0.5
    seen = []
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    monkeypatch.setitem(oq.LOSSES, "token", lambda o, t: seen.append(1) or oq.token_mse(o, t))
    model, _ = tiny_model("llama", seed=2)
    cfg = make_config("omniquant", "w4a8", {**TINY, "epochs": 1, "loss": "token"})
    quantize(copy.deepcopy(model), "omniquant", cfg, torch.randint(0, 5000, (2, 32)))
    assert len(seen) == 2 * len(decoder_layers(model))                   # every step of every block
    with pytest.raises(Exception, match="loss must be one of mse, token"):
        make_config("omniquant", "w4a8", {"loss": "l1"})


def test_llmc_gqa_trains_one_model_and_deploys_another():
    """gqa="llmc" reproduces LLMC on GQA models: v_proj trained on its raw weights while the folded
    model keeps the norm scaling of its input columns; the exact handling has no such gap."""
    model, _ = tiny_model("llama", seed=2)
    calib = torch.randint(0, 5000, (2, 32))
    for gqa, differs in (("llmc", True), ("exact", False)):
        cfg = make_config("omniquant", "w4a8", {**TINY, "gqa": gqa})
        _, blk, _, _ = next(_blocks(model, calib, cfg, 0.3))
        train, deploy = blk.weights(), blk.weights(deploy=True)
        v = "self_attn.v_proj.weight"
        assert (not torch.equal(train[v], deploy[v])) == differs
        assert torch.equal(train["self_attn.q_proj.weight"], deploy["self_attn.q_proj.weight"])


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_quant_attn_rounds_q_k_v_and_survives_the_cell_cache(arch, tmp_path):
    """quant_attn: every attention module rounds Q (after RoPE), K and V per (head, token) on the
    activation grid (each input holds at most 2^8 distinct values per head and token), the cell
    changes the model's output against the same cell without it, and a cached cell restores the
    rounding: its logits equal the built model's."""
    from slmquant.cells import Cell, CellCache
    model, tok = tiny_model(arch, seed=4)
    ids = torch.randint(0, 5000, (1, 24))
    cells = {qa: Cell("tiny-" + arch, "omniquant", make_config("omniquant", "w4a8", {**TINY, "epochs": 1,
                                                                                    "quant_attn": qa}))
             for qa in (False, True)}
    cache = CellCache(tmp_path)
    built, _, fresh = cache.get(cells[True], model, tok)
    assert fresh and built.config._attn_implementation == attn.NAME
    assert model.config._attn_implementation != attn.NAME                 # the float model untouched
    seen = []
    for layer in decoder_layers(built):
        q = getattr(layer.self_attn, attn.CHILD)
        q.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        out = built(ids).logits
        plain = cache.get(cells[False], model, tok)[0](ids).logits
    assert len(seen) == 3 * len(decoder_layers(built))                    # Q, K, V in every layer
    for t in seen:                                                         # on a per-(head, token) grid
        levels = max(len(torch.unique(row)) for row in t.reshape(-1, t.shape[-1]))
        assert levels <= 256
    assert not torch.allclose(out, plain)
    again, _, fresh = CellCache(tmp_path).get(cells[True], model, tok)
    assert not fresh and again.config._attn_implementation == attn.NAME
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)


@pytest.mark.parametrize("where", ["loss", "param"])
def test_a_nonfinite_step_falls_back_to_the_last_finite_state(monkeypatch, tmp_path, where):
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    model, _ = tiny_model("llama", seed=0)
    calib = torch.randint(0, 5000, (2, 32))
    one = quantize(copy.deepcopy(model), "omniquant", make_config("omniquant", "w4a8", {**TINY, "epochs": 1}), calib)
    calls = {"n": 0}
    if where == "loss":
        real = oq.block_loss

        def block_loss(*a):
            calls["n"] += 1
            loss = real(*a)
            return loss * float("nan") if calls["n"] == 4 else loss    # block 0, epoch 2, step 2
        monkeypatch.setattr(oq, "block_loss", block_loss)
    else:
        real_step = torch.optim.AdamW.step

        def step(self, *a, **k):
            calls["n"] += 1
            out = real_step(self, *a, **k)
            if calls["n"] == 4:                                          # the last step of epoch 2
                with torch.no_grad():
                    self.param_groups[0]["params"][0][0] = float("inf")
            return out
        monkeypatch.setattr(torch.optim.AdamW, "step", step)
    q = quantize(copy.deepcopy(model), "omniquant", make_config("omniquant", "w4a8", {**TINY, "epochs": 3}), calib)
    info = q.slmquant_method_info
    assert info["nonfinite_blocks"] == [0] and len(info["loss"][0]) == 1 and len(info["loss"][1]) == 3
    for name, t in q.model.layers[0].state_dict().items():       # block 0 = its state after epoch 1
        assert torch.isfinite(t).all() and torch.equal(t, one.model.layers[0].state_dict()[name]), name
    with torch.no_grad():
        assert torch.isfinite(q(calib).logits).all()


def test_an_interrupted_build_resumes_from_its_last_finished_block(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    model, _ = tiny_model("qwen2", seed=0)
    calib = torch.randint(0, 5000, (2, 32))
    cfg = make_config("omniquant", "w4a8", {**TINY, "epochs": 2})
    whole = quantize(copy.deepcopy(model), "omniquant", cfg, calib)
    assert not list(tmp_path.glob("omniquant-resume/*/*"))              # a finished build cleans up
    real, calls = oq.train_block, {"n": 0}

    def train_block(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(oq, "train_block", train_block)
    with pytest.raises(KeyboardInterrupt):
        quantize(copy.deepcopy(model), "omniquant", cfg, calib)
    monkeypatch.setattr(oq, "train_block", real)
    resumed = quantize(copy.deepcopy(model), "omniquant", cfg, calib)
    assert resumed.slmquant_method_info["resumed_blocks"] == 1
    assert resumed.slmquant_method_info["loss"] == whole.slmquant_method_info["loss"]
    with torch.no_grad():
        assert torch.equal(resumed(calib).logits, whole(calib).logits)


def test_gptq_weights_are_gptq_of_the_folded_block(monkeypatch, tmp_path):
    """weights="gptq": each linear of a block holds GPTQ's rounding (slmquant's defaults) of its
    LET-folded float weights, on LWC's clipped range per row, against the Hessian of the block's
    inputs (block 0: the embeddings), computed here from the pieces; RTN's cell holds other weights,
    and its activations are still quantized. Groups are refused (LWC's ranges are per row here)."""
    from slmquant.methods.gptq import GPTQConfig, _collect, gptq_weight
    from slmquant.quant import lwc_qparams
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    model, _ = tiny_model("qwen2", seed=5)
    calib = torch.randint(0, 5000, (2, 32))
    built = {w: quantize(copy.deepcopy(model), "omniquant", make_config(
        "omniquant", "w4a8", {**TINY, "epochs": 0, "weights": w}), calib) for w in ("rtn", "gptq")}
    cfg = make_config("omniquant", "w4a8", {**TINY, "epochs": 0})
    ref = copy.deepcopy(model)
    layer, blk, x, kw = next(_blocks(ref, calib, cfg, perturb=0.0))
    oq.fold_block_(layer, blk, cfg, quantize=False)
    mods = {n: layer.get_submodule(n) for n in blk.amap.linears}
    hess: dict = {}
    _collect(layer, mods, x, kw, hess)
    g = GPTQConfig()
    got = decoder_layers(built["gptq"])[0]
    for n, lin in mods.items():
        grid = lwc_qparams(lin.weight, cfg.w_spec, *blk.lwc[n])              # the clipped range
        want = gptq_weight(lin.weight, hess[n]["H"], cfg.w_spec, g.block_size, g.damp, g.act_order,
                           params=grid).weight
        q = got.get_submodule(n)
        assert torch.allclose(q.weight, want, rtol=0, atol=1e-6), n
        assert q.a_spec == cfg.a_spec
        assert not torch.allclose(q.weight, decoder_layers(built["rtn"])[0].get_submodule(n).weight)
    with pytest.raises(Exception, match="weights must be rtn or gptq"):
        make_config("omniquant", "w4a8", {"weights": "awq"})
    with pytest.raises(Exception, match="weights=gptq takes per-channel weights"):
        make_config("omniquant", "w4a8", {"weights": "gptq", "group_size": 64})


@pytest.mark.parametrize("setting, message", [("gqa=mqa", "gqa must be"), ("alpha=2", "alpha"),
                                              ("epochs=-1", "epochs")])
def test_bad_settings_are_refused(setting, message):
    from slmquant.errors import SlmquantError
    k, v = setting.split("=")
    with pytest.raises(SlmquantError, match=message):
        make_config("omniquant", "w4a8", {k: v})
    with pytest.raises(SlmquantError, match="let=true needs quantized activations"):
        make_config("omniquant", "w4a16", {"let": "true"})
    with pytest.raises(SlmquantError, match="quant_attn=true needs quantized activations"):
        make_config("omniquant", "w4a16", {"quant_attn": "true"})
    for bits, sets in (("w4a16", {"let_down": "true"}), ("w4a8", {"let": "false", "let_down": "true"})):
        with pytest.raises(SlmquantError, match="let_down=true needs LET"):
            make_config("omniquant", bits, sets)


@pytest.mark.parametrize("alias", [pytest.param("smollm2-135m", marks=pytest.mark.smollm2),
                                   pytest.param("qwen2.5-0.5b", marks=[pytest.mark.qwen2, pytest.mark.slow])])
def test_let_fold_keeps_the_whole_bundled_model(alias, float_models):
    """The same fold on the real models in float32, one window of 128 WikiText-2 tokens: the LET
    start computed from that window (SmolLM2's activation maxima reach the hundreds, so s spans
    orders of magnitude), folded into every block without quantization; with `let_down`, so that
    SmolLM2's large down_proj inputs are folded too."""
    from slmquant import evaluate
    model, tok = float_models(alias)
    model = copy.deepcopy(model).float()
    ids = evaluate.wikitext2_tokens(tok)[:128][None].to(next(model.parameters()).device)
    cfg = make_config("omniquant", "w4a8", {"calib_samples": 1, "calib_seqlen": 128, "let_down": True})
    with torch.no_grad():
        ref = model(ids).logits
    spans = []
    for layer, blk, _, _ in list(_blocks(model, ids, cfg, 0.0)):
        s = blk.let["input_layernorm"].detach()
        spans.append(float(s.max() / s.min()))
        oq.fold_block_(layer, blk, cfg, quantize=False)
    with torch.no_grad():
        out = model(ids).logits
    err = float((out - ref).abs().max() / ref.abs().max())
    assert max(spans) > 10                                  # the scales are far from uniform
    assert err < 1e-4, err
