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
