"""`kairos generate` as a user runs it."""

import json
import subprocess
import sys


def kairos(*args):
    return subprocess.run([sys.executable, "-m", "kairos.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_json_lines_one_per_prompt():
    run = kairos("generate", "--model", "tiny", "--prompt", "Hello", "--prompt", "Once upon a time",
                 "--max-tokens", "7", "--temperature", "0", "--ignore-eos", "--json")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(lines) == 2
    for obj in lines:
        assert len(obj["token_ids"]) == 7 and obj["finish_reason"] == "length"
        assert obj["prompt_token_ids"][0] == 0  # BOS
        assert isinstance(obj["text"], str)
    again = kairos("generate", "--prompt", "Hello", "--max-tokens", "7", "--temperature", "0", "--ignore-eos", "--json")
    assert json.loads(again.stdout.splitlines()[0])["token_ids"] == lines[0]["token_ids"]


def test_generate_seeded_sampling_and_stop():
    args = ["generate", "--prompt", "The quick", "--max-tokens", "12", "--temperature", "0.9", "--top-k", "50",
            "--top-p", "0.95", "--seed", "11", "--json"]
    first, second = kairos(*args), kairos(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    text = json.loads(first.stdout)["text"]
    stop = next(c for c in text[3:] if c.strip() and c != "\ufffd")
    stopped = json.loads(kairos(*args, "--stop", stop).stdout)
    assert stopped["finish_reason"] == "stop" and stopped["text"] == text[: text.index(stop)]


def test_generate_plain_output_shows_the_text():
    run = kairos("generate", "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0")
    assert run.returncode == 0, run.stderr
    assert "Hello" in run.stdout and "finish:" in run.stdout


def test_engine_flags_are_engine_config_fields_and_round_trip_through_a_childs_argv():
    import dataclasses

    from kairos.cli.engine_flags import FIELDS, engine_argv, engine_kwargs
    from kairos.cli.main import build_parser
    from kairos.engine.config import EngineConfig

    assert {f.name for f in FIELDS} == {f.name for f in dataclasses.fields(EngineConfig)} - {"seed", "role"}
    settings = {"model": "some/folder", "dtype": "float16", "num_kv_blocks": 7, "enable_prefix_caching": False,
                "prefill_policy": "kairos", "gpu_memory_utilization": 0.5, "max_model_len": None}
    argv = engine_argv(**settings)
    assert "--no-prefix-caching" in argv and "--max-model-len" not in argv
    for command in ("generate", "prefill", "decode", "serve"):
        extra = ["--prompt", "x"] if command == "generate" else []
        parsed = engine_kwargs(build_parser().parse_args([command, *extra, *argv]))
        assert {k: parsed[k] for k in settings} == settings
        defaults = {f.name: f.default for f in FIELDS if f.name not in settings}
        assert {k: parsed[k] for k in defaults} == defaults


def test_serve_hands_verbose_to_its_children_ahead_of_their_command(monkeypatch):
    from kairos.cli.main import build_parser
    from kairos.transport import serve

    started = []
    monkeypatch.setattr(serve.subprocess, "Popen", lambda cmd, **kwargs: started.append(cmd))
    serve.ProcessGroup(verbose=True).start("prefill", ["prefill", "--router", "tcp://127.0.0.1:1"])
    (cmd,) = started
    args = build_parser().parse_args(cmd[cmd.index("kairos.cli") + 1:])
    assert args.verbose and args.command == "prefill"
