"""The `moe-explained` command: the installed script, `python -m`, and `main()` in-process."""
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe_explained.cli import COMMANDS, _bytes, _count, _flops, arg, main, subcommand
from moe_explained.configs import CONFIGS, SOURCES, get_config
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


# --- run as a process: exit status, stderr and stdout of `python -m moe_explained.cli` from this checkout ---

ROOT = Path(__file__).resolve().parents[1]
CLI_ENV = {**ENV, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
TINY = ROOT / "moe_explained" / "models" / "tiny-mixtral"   # the packaged 3.9M-parameter model of chapter 05


def cli(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "moe_explained.cli", *argv], capture_output=True, text=True,
                          env=CLI_ENV, timeout=300, **kwargs)


@pytest.mark.parametrize("n, count, nbytes, flops", [
    (46_702_792_704, "46.70B", "46.70 GB", "46.70 GFLOPs"), (3_871_872, "3.87M", "3.87 MB", "3.87 MFLOPs"),
    (12_345, "12.35K", "12.35 kB", "12.35 kFLOPs"), (999, "999", "999 bytes", "999 FLOPs"), (0, "0", "0 bytes", "0 FLOPs")])
def test_units_fit_the_size(n, count, nbytes, flops):
    assert (_count(n), _bytes(n), _flops(n)) == (count, nbytes, flops)


def test_small_models_are_not_zero_billion(tmp_path):
    res = cli("params", str(TINY))
    assert res.returncode == 0, res.stderr
    assert "3,871,872           3.87M" in res.stdout and "1.51M" in res.stdout
    # the tied LM head is a matmul too: 2 * 4096 * 128 = 1.05 MFLOPs of the 7.22
    assert "7.22 MFLOPs (all experts: 11.94 MFLOPs)" in res.stdout and "16-bit 7.74 MB" in res.stdout
    assert "2-bit 967.97 kB" in res.stdout
    tiny = dict(get_config("llama-2-7b"), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, vocab_size=32)
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    res = cli("params", str(tmp_path), "--n-ctx", "0", "--bits", "16", "1")
    assert res.returncode == 0, res.stderr
    pc = count_params(tiny)
    assert pc.total == 3_632
    assert f"{pc.total:,}           3.63K" in res.stdout and "16-bit 7.26 kB | 1-bit 454 bytes" in res.stdout
    assert f"at n_ctx=0: {_flops(pc.flops_per_token(0))}   [" in res.stdout and "kFLOPs" in res.stdout
    for out in (res.stdout, cli("params", str(TINY)).stdout, cli("models").stdout):   # "0.00" only as a share, "0.00%"
        assert not re.search(r"\b0\.00(?!%)", out), out


@pytest.mark.parametrize("make", ["random", "safetensors_header", "binary_after_text", "folder"])
def test_binary_file_is_one_clear_line(make, tmp_path):
    target = tmp_path / "model.bin"
    if make == "random": target.write_bytes(random.Random(0).randbytes(5000))
    elif make == "safetensors_header": target.write_bytes((18).to_bytes(8, "little") + b'{"__metadata__":{}}' + b"\0" * 64)
    elif make == "binary_after_text": target.write_bytes(b"{" + b" " * 10_000 + b"\xff\xfe\x00")
    else: (target := tmp_path / "ckpt").mkdir(); (target / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    res = cli("params", str(target))
    assert res.returncode == 2 and res.stdout == ""
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    named = target / "config.json" if make == "folder" else target
    assert f"error: {named} is not a config.json" in res.stderr and "binary" in res.stderr


def test_shipped_weights_file_is_not_a_config():
    res = cli("params", str(TINY / "model.safetensors"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (f"moe-explained params: error: {TINY / 'model.safetensors'} is not a config.json: it holds "
                                  "binary data, not JSON text; pass the model's config.json (or the folder holding it), "
                                  "not its weights or other files")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hub_id_of_a_shipped_config_is_accepted(name, capsys, monkeypatch):
    monkeypatch.setattr(socket, "socket", lambda *a, **k: pytest.fail("the CLI must not use the network"))
    for hub_id in (SOURCES[name][0], SOURCES[name][0].upper()):
        assert main(["params", hub_id, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["name"], out["total"]) == (name, count_params(name).total)
    assert main(["params", SOURCES[name][0].lower()]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{name}  ({CONFIGS[name]['model_type']}; hub config {SOURCES[name][0]})"


def test_other_hub_id_says_how_to_pass_a_config(capsys, monkeypatch):
    monkeypatch.setattr(socket, "socket", lambda *a, **k: pytest.fail("the CLI must not use the network"))
    assert main(["params", "Qwen/Qwen1.5-MoE-A2.7B"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "'Qwen/Qwen1.5-MoE-A2.7B'" in err and "does not download from the Hugging Face hub" in err
    assert "download its config.json (https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/resolve/main/config.json)" in err
    assert "pass the path" in err
    assert main(["params", "nowhere/config.json"]) == 2   # a path that does not exist is not taken for a hub id
    assert "unknown model 'nowhere/config.json'" in capsys.readouterr().err


def test_local_path_wins_over_a_hub_id(tmp_path, capsys, monkeypatch):
    d = dict(get_config("mixtral-8x7b"), num_hidden_layers=4)
    (tmp_path / "mistralai" / "Mixtral-8x7B-v0.1").mkdir(parents=True)
    (tmp_path / "mistralai" / "Mixtral-8x7B-v0.1" / "config.json").write_text(json.dumps(d))
    monkeypatch.chdir(tmp_path)
    assert main(["params", "mistralai/Mixtral-8x7B-v0.1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == count_params(d).total


def test_hub_id_from_the_installed_script(venv_tool):
    res = subprocess.run([venv_tool("moe-explained"), "params", "mistralai/Mixtral-8x7B-v0.1"], capture_output=True,
                         text=True, env=CLI_ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "46,702,792,704" in res.stdout


@pytest.mark.parametrize("unbuffered", ["1", None])
@pytest.mark.parametrize("argv", [["models"], ["params", "mixtral-8x7b"], ["params", "olmoe-1b-7b", "--json"]])
def test_closed_stdout_exits_0_quietly(argv, unbuffered):
    "The reader of the pipe is gone before the command writes a byte: the write fails with EPIPE, every time."
    env = {k: v for k, v in CLI_ENV.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered: env["PYTHONUNBUFFERED"] = unbuffered
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run([sys.executable, "-m", "moe_explained.cli", *argv], stdout=w, stderr=subprocess.PIPE,
                             text=True, env=env, timeout=300)
    finally:
        os.close(w)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""   # no traceback, no "Exception ignored ... BrokenPipeError"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("head") is None, reason="needs bash and head")
@pytest.mark.parametrize("argv", ["models", "params mixtral-8x7b"])
def test_piped_into_head_exits_0(argv):
    py = shlex.quote(sys.executable)
    for reader in ("head -n 1", "true"):   # `true` never reads: the pipe is closed before the command writes
        res = subprocess.run(["bash", "-c", f"set -o pipefail; {py} -m moe_explained.cli {argv} | {reader}"],
                             capture_output=True, text=True, env=CLI_ENV, timeout=300)
        assert res.returncode == 0, (reader, res.returncode, res.stderr)
        assert res.stderr == "" and len(res.stdout.splitlines()) == (1 if reader.startswith("head") else 0)
