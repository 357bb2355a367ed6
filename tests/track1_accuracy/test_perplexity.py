import math

import pytest
import torch

from slmquant import data, evaluate
from slmquant.errors import SlmquantError
from slmquant.models import tiny_model

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side. ") * 4


def _hand_written_ppl(model, ids, seqlen):
    """exp(mean over windows and positions of -log p(next token)), with an explicit log-sum-exp."""
    total, count = 0.0, 0
    for w in range(ids.numel() // seqlen):
        win = ids[w * seqlen:(w + 1) * seqlen]
        logits = model(win[None]).logits[0].double()
        for t in range(seqlen - 1):
            row = logits[t]
            m = max(row.tolist())
            lse = m + math.log(sum(math.exp(v - m) for v in row.tolist()))
            total += lse - row[win[t + 1]].item()
            count += 1
    return math.exp(total / count), count


def test_perplexity_against_hand_written_cross_entropy():
    model, tok = tiny_model("llama", seed=0)
    ids = data.tokenize_text(tok, TEXT)
    seqlen = 16
    with torch.no_grad():
        expected, count = _hand_written_ppl(model, ids, seqlen)
        res = evaluate.perplexity(model, ids, seqlen=seqlen, batch_size=3, progress=False)
    assert res.n_tokens == count and res.n_windows == ids.numel() // seqlen
    assert res.ppl == pytest.approx(expected, rel=1e-5)
    # random weights: perplexity near the vocabulary size
    assert 0.3 * len(tok) < res.ppl < 3 * len(tok)


def test_window_selection():
    assert evaluate.select_windows(10, None) == (list(range(10)), "all")
    assert evaluate.select_windows(10, 3) == ([0, 1, 2], "first:3")
    idx, label = evaluate.select_windows(100, 5, sample_seed=0)
    assert len(set(idx)) == 5 and label == "sample:5:seed=0"
    assert evaluate.select_windows(100, 5, sample_seed=0)[0] == idx
    with pytest.raises(SlmquantError):
        evaluate.select_windows(10, 0)


def test_smollm2_short_windows(smollm2):
    model, tok = smollm2
    tokens = evaluate.wikitext2_tokens(tok)
    assert 300_000 < tokens.numel() < 310_000        # ~305k tokens of the test string
    res = evaluate.perplexity(model, tokens, seqlen=256, limit=4, progress=False, reference=lambda i: _ref(model, tokens, i))
    assert res.n_tokens == 4 * 255
    assert 5 < res.ppl < 60
    assert res.extra["sqnr_db"] > 80 and res.extra["kl"] < 1e-8      # the model against itself


def _ref(model, tokens, i):
    with torch.no_grad():
        return model(tokens[i * 256:(i + 1) * 256][None]).logits[0].float()


def _model_and_reference(n_windows: int):
    """A tiny llama, random token ids of n_windows x 32, and another tiny llama's logits per window."""
    model, _ = tiny_model("llama", seed=0)
    other, _ = tiny_model("llama", seed=1)
    ids = torch.randint(0, 1000, (n_windows * 32,))

    def ref(i):
        with torch.no_grad():
            return other(ids[i * 32:(i + 1) * 32][None]).logits[0].float()
    return model, ids, ref


def test_kl_without_sqnr_is_the_same_kl():
    """The gate leaves the SQNR out (sqnr=False): the KL must not change by a bit."""
    model, ids, ref = _model_and_reference(3)
    full = evaluate.perplexity(model, ids, seqlen=32, progress=False, reference=ref)
    lean = evaluate.perplexity(model, ids, seqlen=32, progress=False, reference=ref, sqnr=False)
    assert "sqnr_db" in full.extra and "sqnr_db" not in lean.extra and full.extra["kl"] > 0
    assert lean.extra["kl"] == full.extra["kl"] and lean.extra["window_kl"] == full.extra["window_kl"]
    assert lean.nll_sum == full.nll_sum


def test_stop_kl_gives_a_lower_bound_of_the_kl():
    """Scoring stopped early (the mutation battery's shortcut) reports the KL summed over the windows
    scored divided by every window's positions: never above the full KL, and above stop_kl."""
    model, ids, ref = _model_and_reference(6)
    full = evaluate.perplexity(model, ids, seqlen=32, progress=False, reference=ref, sqnr=False)
    w = full.extra["window_kl"]
    stop = (w[0] + w[1] + w[2] / 2) / (6 * 32)                # passed within the third window
    part = evaluate.perplexity(model, ids, seqlen=32, progress=False, reference=ref, sqnr=False, stop_kl=stop)
    assert part.extra["stopped"] and part.n_windows == 3 and part.extra["window_kl"] == w[:3]
    assert stop < part.extra["kl"] == sum(w[:3]) / (6 * 32) < full.extra["kl"]
    assert part.window_nll == full.window_nll[:3]
    never = evaluate.perplexity(model, ids, seqlen=32, progress=False, reference=ref, sqnr=False,
                                stop_kl=full.extra["kl"])
    assert "stopped" not in never.extra and never.extra["kl"] == full.extra["kl"] and never.ppl == full.ppl
    with pytest.raises(SlmquantError, match="reference"):
        evaluate.perplexity(model, ids, seqlen=32, progress=False, stop_kl=0.1)


def test_window_nll_gives_the_perplexity_of_a_prefix():
    model, tok = tiny_model("llama", seed=0)
    ids = torch.randint(0, 1000, (5 * 32,))
    full = evaluate.perplexity(model, ids, seqlen=32, batch_size=2, progress=False)
    two = evaluate.perplexity(model, ids, seqlen=32, limit=2, progress=False)
    assert len(full.window_nll) == 5 and math.isclose(sum(full.window_nll), full.nll_sum, rel_tol=1e-9)
    assert math.isclose(full.ppl_of_first(2), two.ppl, rel_tol=1e-6)
    with pytest.raises(SlmquantError):
        full.ppl_of_first(6)


def test_measurement_cache_hits_misses_and_corruption(tmp_path):
    from slmquant.measure import MeasureCache
    model, tok = tiny_model("llama", seed=0)
    ids = torch.randint(0, 1000, (4 * 32,))
    store, loads = MeasureCache(tmp_path), []

    def load():
        loads.append(1)
        return model
    a = store.wikitext2("m1", load, ids, seqlen=32, limit=2, progress=False)
    b = store.wikitext2("m1", load, ids, seqlen=32, limit=2, progress=False)
    assert not a["from_cache"] and b["from_cache"] and a["ppl"] == b["ppl"] and len(loads) == 1
    store.wikitext2("m1", load, ids, seqlen=32, limit=3, progress=False)       # other windows: measured
    store.wikitext2("m2", load, ids, seqlen=32, limit=2, progress=False)       # other model state
    assert len(loads) == 3
    for f in tmp_path.glob("ppl-*.json"):
        f.write_text("{truncated")
    c = store.wikitext2("m1", load, ids, seqlen=32, limit=2, progress=False)
    assert not c["from_cache"] and c["ppl"] == a["ppl"] and len(loads) == 4


def test_first_windows_derive_from_a_full_measurement(tmp_path):
    from slmquant.measure import MeasureCache
    model, tok = tiny_model("llama", seed=0)
    ids = torch.randint(0, 1000, (4 * 32,))
    store = MeasureCache(tmp_path)
    full = store.wikitext2("m", lambda: model, ids, seqlen=32, limit="all", progress=False)
    two = store.wikitext2("m", lambda: pytest.fail("must not score again"), ids, seqlen=32, limit=2, progress=False)
    direct = evaluate.perplexity(model, ids, seqlen=32, limit=2, progress=False)
    assert two["derived_from"] == full["key"] and math.isclose(two["ppl"], direct.ppl, rel_tol=1e-6)
