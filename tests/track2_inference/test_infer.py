"""Track 2 measurements on tiny models: MACs with integer matmuls counted (torch's counter has no
formula for them), speed and memory records, and `slmquant profile` end to end."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from slmquant import infer
from slmquant.methods import make_config, quantize
from slmquant.models import tiny_model
from slmquant.real import to_real


def _macs_by_hand(model, n_tokens: int) -> int:
    """Every linear of the decoder (in x out per token) plus the tied LM head; attention's two
    batched matmuls (scores and values) per layer and head."""
    c = model.config
    lin = sum(m.in_features * m.out_features for n, m in model.named_modules()
              if n.startswith("model.layers") and hasattr(m, "in_features"))
    head = c.hidden_size * c.vocab_size
    attn = c.num_hidden_layers * c.num_attention_heads * 2 * n_tokens * n_tokens * c.head_dim
    return n_tokens * (lin + head) + attn


@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a16"])
def test_macs_count_integer_matmuls(bits):
    model, tok = tiny_model("llama")
    ids = infer.fixed_input(tok, 16)
    f = infer.macs(model, ids)
    assert f["int"] == 0 and f["total"] == _macs_by_hand(model, 16)
    quantize(model, "rtn", make_config("rtn", bits))
    r = infer.macs(to_real(copy.deepcopy(model)), ids)
    linears = 16 * sum(m.in_features * m.out_features for n, m in model.named_modules()
                       if n.startswith("model.layers") and hasattr(m, "in_features"))
    if bits == "w4a16":
        assert r["int"] == 0 and r["total"] == f["total"]            # dequantized: float matmuls
    else:
        from slmquant.real import _has_vnni
        passes = 2 if bits == "w8a8" and not _has_vnni() else 1     # u7x2 runs (and counts) two passes
        assert r["int"] == passes * linears
        assert r["float"] == f["total"] - linears


def test_measure_records_speed_memory_and_storage():
    model, tok = tiny_model("qwen2")
    quantize(model, "rtn", make_config("rtn", "w8a8"))
    real = to_real(copy.deepcopy(model))
    ids = infer.fixed_input(tok, 8)
    t = infer.measure(real, ids, iters=2, warmup=1, decode_tokens=3)
    assert t.prefill_tokens == 8 and t.prefill_tok_s > 0 and t.decode_tokens == 3 and t.decode_tok_s > 0
    assert t.peak_mem_bytes >= t.model_bytes == infer.model_bytes(real) > 0
    assert t.macs["int"] > 0


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.rtn
@pytest.mark.w4a8
def test_cli_profile(capsys, tmp_path):
    """The whole bundled SmolLM2 (one timed iteration): minutes on a loaded 2-core machine."""
    from slmquant.cli import main
    from slmquant.real import load_real
    assert main(["profile", "smollm2-135m", "rtn", "w4a8", "--iters", "1", "--warmup", "0",
                 "--decode-tokens", "2", "--save", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["kernels"] and res["ratios"]["storage_vs_float16"] < 0.42
    assert res["real"]["macs"]["int"] > 0 and res["float"]["macs"]["int"] == 0
    model, _ = load_real(tmp_path)
    assert model.slmquant_record["cell"] == res["cell"]


def test_model_bytes_count_the_prepacked_kernel_weights():
    """oneDNN's prepacked int8 weights live outside the module's buffers: memory figures must count
    them once they exist (a real W4A8 model runs with int8 copies of its packed 4-bit weights)."""
    model, tok = tiny_model("llama")
    quantize(model, "rtn", make_config("rtn", "w4a8"))
    real = to_real(copy.deepcopy(model), kernel="onednn_u8s8")
    before = infer.model_bytes(real)
    real(infer.fixed_input(tok, 4))
    linears = [m for n, m in real.named_modules() if n.startswith("model.layers") and hasattr(m, "in_features")]
    packed = sum(m.in_features * m.out_features for m in linears)        # one int8 byte a weight
    row_sums = sum(2 * 4 * m.out_features for m in linears)               # two float32 vectors a layer
    assert infer.model_bytes(real) - before == packed + row_sums


def test_prefill_side_by_side_times_every_model():
    model, tok = tiny_model("llama")
    ids = infer.fixed_input(tok, 8)
    calls = {"a": 0, "b": 0}

    class Counting(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls[self.name] += 1
            return model(x)
    rates = infer.prefill_side_by_side([Counting("a"), Counting("b")], ids, iters=6, warmup=2, rounds=3)
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert calls == {"a": 8, "b": 8}                                   # 2 warm-ups + 3 rounds x 2
