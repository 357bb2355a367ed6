"""Track 1's multiple-choice tasks: the documents built from the verified files, the seeded samples,
and lm-eval run offline on a model object, checked against a hand-written loglikelihood scorer."""
from __future__ import annotations

import json
import socket

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmquant.cli import main
from slmquant.errors import SlmquantError
from slmquant.models import tiny_model
from slmquant.tasks import TASKS, TaskSettings, documents, evaluate_tasks, sample_indices

pytestmark = pytest.mark.track1

ROWS = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042, "mmlu": 14042,
        "mmlu_cloze": 14042}          # MANIFEST.md


@pytest.mark.parametrize("task", TASKS)
def test_documents_have_every_row_and_a_valid_gold(task):
    docs = documents(task)
    assert len(docs) == ROWS[task]
    assert all(0 <= d["gold"] < len(d["choices"]) for d in docs)
    assert all(d["query"] and all(c for c in d["choices"]) for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)


def test_prompts_follow_the_official_forms():
    arc = documents("arc_easy")[0]
    assert arc["query"].startswith("Question: ") and arc["query"].endswith("\nAnswer:")
    cloze, letters = documents("mmlu_cloze")[0], documents("mmlu")[0]
    assert cloze["query"].startswith("The following are questions about abstract algebra.\nQuestion: ")
    assert cloze["choices"] == ["0", "4", "2", "6"] and cloze["gold"] == 1
    assert letters["query"].endswith("\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:") and letters["choices"] == list("ABCD")
    assert not any("[" in c for d in documents("hellaswag")[:500] for c in d["choices"]), "WikiHow brackets left"


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 5000), limit=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_seeded_samples_are_sorted_distinct_and_reproducible(n, limit, seed):
    idx = sample_indices(n, limit, seed)
    assert idx == sample_indices(n, limit, seed) and idx == sorted(set(idx))
    assert len(idx) == min(n, limit) and all(0 <= i < n for i in idx)


def test_a_sample_is_not_the_first_items():
    assert sample_indices(1000, 20, 0) != list(range(20))
    assert sample_indices(1000, 20, 0) != sample_indices(1000, 20, 1)


def _by_hand(model, tok, docs):
    """acc and acc_norm by our own loglikelihood: the choice (after a space) as a continuation of the
    query, tokenized as whole text then split (lm-eval's causal convention), no BOS."""
    acc = acc_norm = 0
    for d in docs:
        ctx = tok(d["query"], add_special_tokens=False).input_ids
        lls = []
        for c in d["choices"]:
            whole = tok(d["query"] + " " + c, add_special_tokens=False).input_ids
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
            pos = torch.arange(len(ctx) - 1, len(whole) - 1)
            lls.append(logp[pos, torch.tensor(cont)].sum().item())
        lls = torch.tensor(lls, dtype=torch.float64)
        lens = torch.tensor([float(len(c)) for c in d["choices"]], dtype=torch.float64)
        acc += int(lls.argmax()) == d["gold"]
        acc_norm += int((lls / lens).argmax()) == d["gold"]
    return acc / len(docs), acc_norm / len(docs)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("task", ["arc_challenge", "hellaswag", "mmlu_cloze"])
def test_lm_eval_offline_equals_a_hand_written_scorer(task, no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    model, tok = tiny_model("llama")
    s = TaskSettings(limit=6, batch_size=8)
    got = evaluate_tasks(model, tok, [task], s)[task]
    docs = documents(task)
    docs = [docs[i] for i in sample_indices(len(docs), s.limit, s.seed)]
    acc, acc_norm = _by_hand(model, tok, docs)
    assert got.n_items == 6 and got.doc_ids == sample_indices(len(documents(task)), s.limit, s.seed)
    assert sum(got.correct) / 6 == pytest.approx(got.acc) and sum(got.correct_norm) / 6 == pytest.approx(got.acc_norm)
    assert [len(x) for x in got.lls] == [len(d["choices"]) for d in docs]
    assert got.acc == pytest.approx(acc) and got.acc_norm == pytest.approx(acc_norm)
    assert got.settings["lm_eval"] and got.settings["max_length"] == 2048 and got.settings["seed"] == s.seed


def test_requests_are_batched(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    model, tok = tiny_model("qwen2")
    calls = []
    h = model.register_forward_hook(lambda m, a, k, out: calls.append(a[0].shape[0] if a else k["input_ids"].shape[0]),
                                    with_kwargs=True)
    try:
        evaluate_tasks(model, tok, ["piqa"], TaskSettings(limit=8, batch_size=8))
    finally:
        h.remove()
    assert sum(calls) == 16                      # 8 items x 2 choices
    assert max(calls) > 1 and len(calls) < 16    # more than one request per forward pass


def test_unknown_task_and_bad_limit_are_refused():
    model, tok = tiny_model("llama")
    with pytest.raises(SlmquantError, match="unknown task.*known: arc_easy"):
        evaluate_tasks(model, tok, ["winogrande"])
    with pytest.raises(SlmquantError, match="positive"):
        TaskSettings(limit=0)


def test_cli_eval_runs_a_task_on_the_bundled_model(capsys):
    assert main(["eval", "smollm2-135m", "--tasks", "arc_easy", "--limit", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["arc_easy"]["n_items"] == 4 and 0 <= res["arc_easy"]["acc_norm"] <= 1
    assert "wikitext2" not in res and "lls" not in res["arc_easy"]     # per-item data stays in the cache


def test_task_measurements_are_cached_per_model_task_and_settings(tmp_path):
    from slmquant.measure import MeasureCache
    store, model, tok = MeasureCache(tmp_path), *tiny_model("llama")
    loads = []

    def load():
        loads.append(1)
        return model, tok

    s = TaskSettings(limit=3, batch_size=4)
    first = store.tasks("tiny:llama", load, ["piqa"], s)["piqa"]
    again = store.tasks("tiny:llama", load, ["piqa"], s)["piqa"]
    assert len(loads) == 1 and not first["from_cache"] and again["from_cache"]
    assert again["acc_norm"] == first["acc_norm"]
    store.tasks("tiny:llama", load, ["piqa"], TaskSettings(limit=4, batch_size=4))
    assert len(loads) == 2                                    # another sample: measured again
    path = tmp_path / f"task-{store.task_key('tiny:llama', 'piqa', s)}.json"
    path.write_text("{corrupt")
    assert not store.tasks("tiny:llama", load, ["piqa"], s)["piqa"]["from_cache"]
