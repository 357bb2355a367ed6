import json
import subprocess
import sys

import pytest

from slmquant.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "slmquant", *args], capture_output=True, text=True, timeout=300)


def test_models_and_data_print_json_last():
    out = {}
    for cmd in ("models", "data"):
        p = _run(cmd, "--json")
        assert p.returncode == 0, p.stderr
        out[cmd] = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["data"]["files"] > 100 and out["data"]["ok"] == out["data"]["files"]      # every checksum
    assert {m["alias"] for m in json.loads(_run("models", "--json").stdout.splitlines()[-1])["models"]} == {
        "smollm2-135m", "qwen2.5-0.5b"}


@pytest.mark.parametrize("argv,needle", [
    (["eval", "llama-7b"], "unknown model 'llama-7b'"),
    (["eval", "smollm2-135m", "--tasks", "squad"], "unknown task(s) squad: available: wikitext2, arc_easy"),
    (["eval", "smollm2-135m", "--limit", "many"], "--limit takes a number or 'all'"),
    (["eval", "smollm2-135m", "--real"], "--real needs a quantized cell"),
    (["run", "--methods", "rtn,gptz"], "unknown method gptz: choose from"),
    (["run", "--bits", "w2a2"], "unknown bits w2a2: choose from w8a8, w4a8, w4a16"),
    (["bench", "--models", "smollm2-135m,llama-7b"], "unknown model 'llama-7b'"),
    (["bench", "--tracks", "1,4"], "--tracks takes a comma-separated subset of 1,2,3"),
    (["bench", "--task-items", "some"], "--task-items takes a positive number or 'all'"),
    (["bench", "--task-items", "0"], "--task-items takes a positive number or 'all'"),
    (["bench", "--device", "mps"], "--device 'mps': choose auto, cpu or cuda[:N]"),
    (["run", "--data-dir", "/nonexistent-slmquant-data"], "data file(s) missing in /nonexistent-slmquant-data"),
    (["bench", "--cells", "gptq"], "--cells takes METHOD:BITS"),
    (["bench", "--cells", "gptq:w4a16:dampp=0.1"], "dampp"),
    (["bench", "--tasks", "squad"], "unknown task squad"),
])
def test_errors_are_one_line_without_traceback(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_data_dir_fails_clearly(tmp_path):
    p = _run("data", "--data-dir", str(tmp_path))
    assert p.returncode == 2
    assert "missing or corrupt" in p.stderr and "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random 2-layer llama saved as a Hugging Face folder: `run` and `bench` load it as they load
    any local model, so these tests check the orchestration (plan, tracks, resume, report) in seconds;
    the bundled models' own loading is checked by the `eval` and `quantize` tests above."""
    from slmquant.models import tiny_model
    model, tok = tiny_model("llama")
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_eval_json(capsys):
    assert main(["eval", "smollm2-135m", "--limit", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["source"]["stand_in_for"] == "HuggingFaceTB/SmolLM2-135M"
    assert res["wikitext2"]["n_windows"] == 1 and res["wikitext2"]["n_tokens"] == 2047


def test_eval_real_scores_what_the_fake_quantized_cell_scores(tiny_folder, capsys):
    """The same cell as a real low-bit model through the same track 1 code, on one 2048-token window
    (a tiny model: the real-model numerics of every default cell are track 2's tests).
    W4A16 (no activation quantization) must match the fake-quantized cell to 0.5%. With 8-bit
    activations a single window is not a fair test (float rounding flips per-token rounding
    decisions at outlier tokens; see tests/track2_inference/test_track2_cells.py), so W4A8 here
    checks the integer kernel record."""
    out = {}
    for bits in ("w4a16", "w4a8"):
        for extra in ([], ["--real"]):
            assert main(["eval", str(tiny_folder), "rtn", bits, "--limit", "1", *extra, "--json"]) == 0
            out[bits, bool(extra)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    real, fake = out["w4a16", True], out["w4a16", False]
    assert real["real"] == {"embeddings": "float16", "kernels": {"dequant": 14}}        # 2 layers x 7
    assert abs(real["wikitext2"]["ppl"] / fake["wikitext2"]["ppl"] - 1) < 0.005
    assert real["wikitext2"]["ppl"] != fake["wikitext2"]["ppl"]          # really a different model
    assert out["w4a8", True]["real"]["kernels"] == {"onednn_u8s8": 14}


def test_quantize_settings_and_errors(tiny_folder, capsys, tmp_path):
    assert main(["quantize", str(tiny_folder), "rtn", "w4a16", "--set", "sym=false", "--group-size", "32",
                 "--out", str(tmp_path), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["cell"].endswith("tiny-llama-rtn-w4a16-group_size=32-sym=False")    # the folder's path, then the cell
    assert rec["settings"]["group_size"] == 32 and rec["settings"]["sym"] is False
    assert rec["cost"]["wall_s"] > 0 and rec["cost"]["peak_mem_bytes"] > 0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "slmquant_cell.json").is_file()
    for argv, needle in [(["quantize", "smollm2-135m", "rtn", "w4a9"], "activation bits 9"),
                         (["quantize", "smollm2-135m", "rtn", "w8a8", "--set", "alpha=1"], "no setting 'alpha'"),
                         (["quantize", "smollm2-135m", "gptz", "w8a8"], "unknown method 'gptz'"),
                         (["quantize", "smollm2-135m", "rtn", "w8a8", "--set", "sym"], "--set takes key=value")]:
        assert main(argv) == 2
        assert needle in capsys.readouterr().err


@pytest.fixture
def cheap_profile(monkeypatch):
    """The quick profile shrunk to seconds a cell: 1 window, 2 items per task, 1 timed prefill."""
    from slmquant import bench, evaluate, profiles
    monkeypatch.setattr(evaluate, "QUICK_WINDOWS", 1)
    monkeypatch.setattr(profiles, "QUICK", {"calib_samples": 2, "calib_seqlen": 256, "epochs": 1,
                                            "steps": 1, "weights": "rtn"})
    monkeypatch.setattr(profiles, "QUICK_BY_METHOD", {})
    monkeypatch.setitem(bench.TASK_ITEMS, "quick", 2)
    monkeypatch.setitem(bench.TRACK2, "quick", {"iters": 1, "warmup": 1, "decode_tokens": 2})


def test_run_writes_resumable_results(cheap_profile, tiny_folder, monkeypatch, tmp_path, capsys):
    from slmquant import profiles
    sel = ["--model", str(tiny_folder), "--methods", "rtn", "--bits", "w4a8", "--device", "cpu"]
    assert main(["run", "--out", str(tmp_path), "--json", *sel]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cells = [r["cell"] for r in res["rows"]]
    assert cells == ["float", "rtn-w4a8"]
    folder = tmp_path / "cpu" / "tiny-llama"
    report = (tmp_path / "report.md").read_text()              # rewritten after every cell
    assert "rtn-w4a8" in report and (tmp_path / "tiny-llama-cpu-scores.png").is_file()
    assert all(r["tokens"] == 2047 for r in res["rows"])
    assert res["rows"][1]["ppl_ratio"] > 1.0
    # all three tracks: five tasks, the real-model measurement, the build's cost; the float cell's outliers
    saved = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    for name, r in saved.items():
        assert all(r[t]["n_items"] == 2 for t in ("mmlu_cloze", "arc_challenge", "arc_easy", "piqa", "hellaswag"))
        assert r["tracks_done"] == ([1] if name == "float" else [1, 2, 3]) and r["schema"] == 1
        assert r["machine"]["threads"] >= 1 and r["machine"]["versions"]["torch"]
    assert saved["rtn-w4a8"]["infer"]["ratios"]["storage_vs_float16"] < 1      # mostly float16 embeddings
    assert saved["rtn-w4a8"]["quantization"]["cost"]["wall_s"] > 0
    assert len(saved["float"]["outliers"]["layers"]) == 2
    # resumes: a second run reads every cell back instead of evaluating it again
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    assert main(["run", "--out", str(tmp_path), *sel]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} == stamp
    assert "rtn-w4a8" in capsys.readouterr().out
    # a torn file (a run killed while writing) is evaluated again; a track measured for another
    # setting or quantizer version (its identity differs) is measured again, a missing track is
    # measured, and a track still valid is kept
    (folder / "float.json").write_text('{"model": ')
    part = json.loads((folder / "rtn-w4a8.json").read_text())
    part["tracks_done"], infer = [1, 3], part.pop("infer")
    part["identity"]["3"] += "beef"
    part["quantization"]["stale"] = True
    part["wikitext2"]["kept"] = True                         # track 1 is not measured again
    elsewhere = {"threads": 64, "cpu_capability": "ELSEWHERE"}
    part["track_machines"]["1"] = elsewhere                  # measured on another machine: stays so
    (folder / "rtn-w4a8.json").write_text(json.dumps(part))
    assert main(["run", "--out", str(tmp_path), "--json", *sel]) == 0
    rows = {r["cell"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert rows["float"]["wikitext2_ppl"] == res["rows"][cells.index("float")]["wikitext2_ppl"]
    again = json.loads((folder / "rtn-w4a8.json").read_text())
    assert again["tracks_done"] == [1, 2, 3] and again["infer"]["real"]["storage"] == infer["real"]["storage"]
    assert again["wikitext2"]["kept"] is True and "stale" not in again["quantization"]
    assert again["track_machines"] == {"1": elsewhere, "2": again["machine"], "3": again["machine"]}
    assert again["identity"] == saved["rtn-w4a8"]["identity"]
    changed = {p.name for p in folder.glob("*.json") if p.stat().st_mtime_ns != stamp[p.name]}
    assert changed == {"float.json", "rtn-w4a8.json"}
    # another calibration budget is another cell: the calibrated method's results are not reused
    from slmquant.bench import Spec, identity
    before = {m: identity(Spec(str(tiny_folder), m, "w8a8"), "quick", 2) for m in ("none", "rtn", "gptq")}
    monkeypatch.setattr(profiles, "QUICK", {"calib_samples": 3, "calib_seqlen": 256})
    after = {m: identity(Spec(str(tiny_folder), m, "w8a8"), "quick", 2) for m in before}
    assert [m for m in before if before[m] != after[m]] == ["gptq"]


def test_bench_selects_tracks_and_adds_a_track_later(cheap_profile, tiny_folder, tmp_path, capsys):
    argv = ["bench", "--out", str(tmp_path), "--models", str(tiny_folder), "--methods", "rtn", "--bits", "w8a8",
            "--json", "--device", "cpu"]
    assert main([*argv, "--tracks", "3"]) == 0                  # the build's cost only
    capsys.readouterr()
    r = json.loads((tmp_path / "cpu" / "tiny-llama" / "rtn-w8a8.json").read_text())
    assert r["tracks_done"] == [3] and "wikitext2" not in r and "infer" not in r and r["quantization"]["cost"]
    assert main([*argv, "--tracks", "2,3"]) == 0
    err = capsys.readouterr().err
    assert "tracks 2" in err and "estimated" in err              # the plan, printed before the work
    r = json.loads((tmp_path / "cpu" / "tiny-llama" / "rtn-w8a8.json").read_text())
    assert r["tracks_done"] == [2, 3] and r["infer"]["slmq_infer"] > 0          # the score of a tiny model
    # --force measures the requested track again and keeps the others
    r["infer"]["kept"] = True
    (tmp_path / "cpu" / "tiny-llama" / "rtn-w8a8.json").write_text(json.dumps(r))
    assert main([*argv, "--tracks", "1", "--force"]) == 0
    r = json.loads((tmp_path / "cpu" / "tiny-llama" / "rtn-w8a8.json").read_text())
    assert r["tracks_done"] == [1, 2, 3] and r["infer"]["kept"] and r["wikitext2"]["n_windows"] == 1


def test_model_specs_become_one_folder_name(tmp_path):
    from slmquant.bench import model_slug
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert model_slug("smollm2-135m") == "smollm2-135m" and model_slug("Qwen/Qwen2.5-0.5B") == "Qwen_Qwen2.5-0.5B"
    assert model_slug(str(gguf)) == "m.gguf" and model_slug(str(tmp_path)) == tmp_path.name


def test_cache_command_reports_and_prunes(monkeypatch, tmp_path, capsys):
    from slmquant.cells import Cell, CellCache
    from slmquant.methods import make_config
    from slmquant.models import tiny_model
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    model, tok = tiny_model("llama")
    CellCache().get(Cell("tiny-llama", "rtn", make_config("rtn", "w8a8")), model, tok)
    assert main(["cache", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["entries"] == 1
    assert main(["cache", "--max-gb", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["removed"] == 1 and res["entries"] == 0


def test_quick_profile_budgets():
    """The quick profile's calibration: 65,536 tokens for every calibrating method, GPTQ cut into its
    paper's 128 windows (of 512 tokens), the others into 32 of 2048; the paper profile sets each
    method's own defaults (SpinQuant's 8 windows a step aside) and RTN calibrates nothing."""
    from slmquant.errors import SlmquantError
    from slmquant.methods import make_config
    from slmquant.profiles import profile_settings
    assert profile_settings("gptq", "quick", "w4a16") == {"calib_samples": 128, "calib_seqlen": 512}
    assert profile_settings("smoothquant", "quick", "w8a8") == {"calib_samples": 32, "calib_seqlen": 2048}
    assert profile_settings("rtn", "quick", "w4a8") == {} == profile_settings("gptq", "paper", "w4a8")
    paper = make_config("gptq", "w4a16")
    assert (paper.calib_samples, paper.calib_seqlen) == (128, 2048)
    with pytest.raises(SlmquantError, match="choose quick, paper, smoke"):
        profile_settings("gptq", "fast", "w4a8")


def test_quick_profile_adds_let_down_at_w8a8_and_w4a8_and_gptq_weights_at_w4a8():
    """OmniQuant's LET pair up_proj -> down_proj is a quick-profile setting of its W8A8 and W4A8
    cells, its GPTQ rounding of W4A8 alone (each measured there); W4A16 (LWC only, where let_down is
    refused) builds its config with neither, and the paper and smoke profiles never add them."""
    from slmquant.methods import make_config
    from slmquant.profiles import profile_settings
    want = {"w4a8": (True, "gptq"), "w8a8": (True, "rtn"), "w4a16": (False, "rtn")}
    for bits, (let_down, weights) in want.items():
        quick = profile_settings("omniquant", "quick", bits)
        cfg = make_config("omniquant", bits, quick)
        assert (cfg.let_down, cfg.weights) == (let_down, weights), bits
        assert quick.get("let_down", False) == let_down and quick.get("weights", "rtn") == weights
        assert profile_settings("omniquant", "quick", bits.upper()) == quick
        for p in ("paper", "smoke"):
            assert not {"let_down", "weights"} & set(profile_settings("omniquant", p, bits))


def test_smoke_profile_builds_the_default_tiers_cells():
    """`--profile smoke` calibrates every method exactly as the test suite's default tier, so a
    smoke run and the suite share cached cells (same cell keys)."""
    from slmquant.cells import Cell
    from slmquant.methods import all_methods, make_config
    from slmquant.profiles import profile_settings
    from tests.matrix import DEFAULT, make_cell
    for method in all_methods():
        for bits in ("w8a8", "w4a8"):
            smoke = Cell("smollm2-135m", method, make_config(method, bits, profile_settings(method, "smoke", bits)))
            assert smoke == make_cell("smollm2-135m", method, bits, {}, DEFAULT), (method, bits)


def test_columns_fit_the_longest_entry():
    from slmquant.cli import columns
    text = columns([("a", "float", "~1 min"), ("qwen2.5-0.5b", "spinquant-w4a8-learn=false-seed=1", "~1 h")])
    assert columns([]) == ""
    first, second = text.splitlines()
    assert first.index("~1 min") == second.index("~1 h")          # a long cell name pushes the column, not the row
    assert first.startswith("  a ") and second.endswith("~1 h")
