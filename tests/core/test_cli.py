import json
import subprocess
import sys

import pytest

from slmquant.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "slmquant", *args], capture_output=True, text=True, timeout=300)


def test_models_and_data_print_json_last():
    for cmd in (["models", "--json"], ["data", "--json"]):
        p = _run(*cmd)
        assert p.returncode == 0, p.stderr
        obj = json.loads(p.stdout.strip().splitlines()[-1])
        assert obj
    assert {m["alias"] for m in json.loads(_run("models", "--json").stdout.splitlines()[-1])["models"]} == {
        "smollm2-135m", "qwen2.5-0.5b"}


@pytest.mark.parametrize("argv,needle", [
    (["eval", "llama-7b"], "unknown model 'llama-7b'"),
    (["eval", "smollm2-135m", "--tasks", "squad"], "unknown task(s) ['squad']"),
    (["eval", "smollm2-135m", "--limit", "many"], "--limit takes a number or 'all'"),
])
def test_errors_are_one_line_without_traceback(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_data_dir_fails_clearly(tmp_path):
    p = _run("data", "--data-dir", str(tmp_path))
    assert p.returncode == 2
    assert "missing or corrupt" in p.stderr and "Traceback" not in p.stderr


def test_eval_json(capsys):
    assert main(["eval", "smollm2-135m", "--limit", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["source"]["stand_in_for"] == "HuggingFaceTB/SmolLM2-135M"
    assert res["wikitext2"]["n_windows"] == 1 and res["wikitext2"]["n_tokens"] == 2047
