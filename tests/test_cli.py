"""The `moe-explained` command: the installed script, `python -m`, and `main()` in-process."""
import json
import os
import subprocess
import sys

import pytest

from moe_explained.cli import COMMANDS, arg, main, subcommand
from moe_explained.configs import CONFIGS, get_config
from moe_explained.dense import count_params

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_installed_script_params(venv_tool):
    res = subprocess.run([venv_tool("moe-explained")] + ["params", "mixtral-8x7b"], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "46,702,792,704" in res.stdout and "12,879,925,248" in res.stdout and "45,097,156,608" in res.stdout


def test_installed_script_unknown_name_exits_2_without_traceback(venv_tool):
    res = subprocess.run([venv_tool("moe-explained")] + ["params", "mixtral-8x9b"], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "unknown model 'mixtral-8x9b'" in res.stderr and all(n in res.stderr for n in CONFIGS)


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "moe_explained.cli", "params", "OLMoE-1B-7B", "--json"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["total"] == 6_919_161_856


@pytest.mark.parametrize("name", list(CONFIGS))
def test_params_json_matches_counter(name, capsys):
    assert main(["params", name.upper(), "--json", "--n-ctx", "2048", "--bits", "16", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    pc = count_params(name)
    assert (out["total"], out["active"], out["attention"], out["experts"]) == (pc.total, pc.active, pc.attention, pc.experts)
    assert out["flops_per_token"] == pc.flops_per_token(2048)
    assert out["weight_bytes"] == {"16": pc.total * 2, "3": pc.total * 3 / 8}


def test_params_text_report(capsys):
    assert main(["params", "llama-2-13b"]) == 0
    out = capsys.readouterr().out
    assert "13,015,864,320" in out and "13.02B" in out and "4,194,304,000" in out
    assert "16-bit 26.03 GB" in out


def test_local_config_and_folder(tmp_path, capsys):
    d = dict(get_config("mixtral-8x7b"), num_hidden_layers=4, num_local_experts=16)
    (tmp_path / "config.json").write_text(json.dumps(d))
    for target in (tmp_path, tmp_path / "config.json"):
        assert main(["params", str(target), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["total"] == count_params(d).total


def test_bad_config_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(get_config("mixtral-8x7b"), num_key_value_heads=5)))
    assert main(["params", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "num_attention_heads (32) is not divisible by num_key_value_heads (5)" in err
    del_field = {k: v for k, v in get_config("llama-2-7b").items() if k != "num_attention_heads"}
    (tmp_path / "config.json").write_text(json.dumps(del_field))
    assert main(["params", str(tmp_path)]) == 2
    assert "missing the field 'num_attention_heads'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["params"], ["params", "mixtral-8x7b", "--bits", "0"],
                                  ["params", "mixtral-8x7b", "--n-ctx", "x"], ["nope"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_models_lists_every_config(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split()[0] for l in lines] == list(CONFIGS)


def test_registering_a_subcommand(capsys):
    @subcommand("echo-test", "echo", arg("word"))
    def echo(args):
        print(args.word)
        return 3
    try:
        assert main(["echo-test", "hi"]) == 3
        assert capsys.readouterr().out == "hi\n"
    finally:
        del COMMANDS["echo-test"]
