import hashlib
import os

import pytest
import torch

from slmquant import data
from slmquant.errors import SlmquantError


def test_every_file_matches_its_checksum():
    root = data.data_dir()
    assert {rel: data.file_status(rel, root) for rel in data.CHECKSUMS} == {rel: "ok" for rel in data.CHECKSUMS}
    assert len(data.CHECKSUMS) == 121


def test_wikitext2_test_string_is_the_gptq_string():
    text = data.wikitext2_text("test")
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == data.WIKITEXT2_TEST_STRING_SHA256
    assert len(data.wikitext2_rows("test")) == 4358


def test_wikitext2_validation_string():
    text = data.wikitext2_text("validation")
    assert len(text) == 1_149_668
    assert hashlib.sha256(text.encode()).hexdigest() == "b44fb967f92b525731216a507d1fbc44b97446b7ef0a2b4d1a893f81f1bbc29e"


@pytest.mark.parametrize("task,rows", [("arc_easy", 2376), ("arc_challenge", 1172), ("piqa", 1838),
                                       ("hellaswag", 10042), ("mmlu", 14042)])
def test_task_row_counts_and_record_shape(task, rows):
    recs = data.TASK_LOADERS[task]()
    assert len(recs) == rows
    assert len({r.id for r in recs}) == rows
    for r in recs:
        assert isinstance(r.context, str) and r.context
        assert 2 <= len(r.choices) <= 5 and 0 <= r.gold < len(r.choices)


def test_mmlu_dev_and_known_quirks():
    assert len(data.load_mmlu("dev")) == 285
    import json
    raw = json.loads(data.verified_path("arc_easy/ARC-Easy-Test.json").read_text())
    numeric = [it for it in raw if it["choices"]["label"][0] == "1"]
    assert len(numeric) == 97            # labelled 1-4: gold found by label, not int()
    easy = {r.id: r for r in data.load_arc_easy()}
    for it in numeric:
        assert easy[it["id"]].gold == int(it["answerKey"]) - 1
    sizes = [len(r.choices) for r in easy.values()]
    assert (sizes.count(3), sizes.count(5)) == (7, 4)
    hs = data.load_hellaswag()
    assert hs[0].context.startswith("Roof shingle removal: A man is sitting on a roof.") and hs[0].gold == 3
    assert [hs_label for hs_label in (r.gold for r in hs)].count(0) == 2515


def _copy_tree(tmp_path):
    root = tmp_path / "data"
    for rel in data.CHECKSUMS:
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(data.data_dir() / rel, dst)
    return root


def test_missing_file_names_file_and_checksum(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "piqa/valid-labels.lst").unlink()
    with pytest.raises(SlmquantError, match=r"piqa/valid-labels.lst is missing: expected sha256 b4192dc3"):
        data.load_piqa(root)


def test_corrupt_file_is_refused(tmp_path):
    root = _copy_tree(tmp_path)
    p = root / "arc_easy/ARC-Easy-Test.json"
    p.unlink()
    p.write_bytes((data.data_dir() / "arc_easy/ARC-Easy-Test.json").read_bytes()[:-10])
    with pytest.raises(SlmquantError, match=r"ARC-Easy-Test.json is corrupt: expected sha256 4d34ed0f"):
        data.load_arc_easy(root)


def test_data_dir_resolution(monkeypatch, tmp_path):
    assert data.data_dir(tmp_path) == tmp_path.resolve()
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.data_dir() == tmp_path.resolve()


def test_calibration_windows_are_seeded(tok):
    a = data.calib_windows(tok, 4, 128, seed=0)
    b = data.calib_windows(tok, 4, 128, seed=0)
    c = data.calib_windows(tok, 4, 128, seed=1)
    assert a.shape == (4, 128) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    text_ids = data.tokenize_text(tok, data.wikitext2_text("validation"))
    first = a[0].tolist()
    assert any(text_ids[i:i + 128].tolist() == first for i in range(text_ids.numel() - 128))
