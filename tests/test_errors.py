"""Bad input fails early with an error that names the problem."""

import json
import shutil
import subprocess
import sys

import pytest
from hf_models import make_checkpoint
from safetensors.torch import load_file, save_file

from kairos.engine import LLM, SamplingParams
from kairos.engine.config import ConfigError


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    make_checkpoint("llama", path)
    return path


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(good_checkpoint, path)
    return path


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture(checkpoint):
    edit_config(checkpoint, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="unknown architecture.*GPT2LMHeadModel"):
        LLM(str(checkpoint))


def test_unsupported_rope_type(checkpoint):
    edit_config(checkpoint, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        LLM(str(checkpoint))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        LLM(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(str(tmp_path / "absent"))


def test_no_weight_files(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        LLM(str(checkpoint))


def test_sharded_index_names_a_missing_shard(checkpoint):
    weights = load_file(checkpoint / "model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    save_file({n: weights[n] for n in names[:half]}, checkpoint / "model-00001-of-00002.safetensors")
    (checkpoint / "model.safetensors").unlink()
    index = {"weight_map": {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="missing.*model-00002-of-00002"):
        LLM(str(checkpoint))
    save_file({n: weights[n] for n in names[half:]}, checkpoint / "model-00002-of-00002.safetensors")
    assert LLM(str(checkpoint), num_kv_blocks=64).generate([5, 6, 7], SamplingParams(max_tokens=2))


def test_missing_tensor(checkpoint):
    weights = load_file(checkpoint / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, checkpoint / "model.safetensors")
    with pytest.raises(ConfigError, match="missing tensors.*model.layers.1.self_attn.k_proj.weight"):
        LLM(str(checkpoint))


def test_unexpected_tensor(checkpoint):
    weights = load_file(checkpoint / "model.safetensors")
    weights["model.layers.0.mlp.extra.weight"] = weights["model.norm.weight"].clone()
    save_file(weights, checkpoint / "model.safetensors")
    with pytest.raises(ConfigError, match="does not use.*mlp.extra"):
        LLM(str(checkpoint))


def test_shape_mismatch(checkpoint):
    edit_config(checkpoint, intermediate_size=128)
    with pytest.raises(ConfigError, match="mlp.(gate|up|down)_proj.weight in model.safetensors has shape .*96.* "
                                          "config.json implies .*128"):
        LLM(str(checkpoint))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), r"max_tokens must be an integer in \[1, "),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=2**31), "max_tokens"),
    (dict(top_k=2**63), "top_k"),  # once overflowed the sampler's tensors and killed the worker
    (dict(temperature=2**63), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(seed=2**64), "seed"),
    (dict(stop_token_ids=[2**40]), "stop_token_ids"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(stop=[""]), "stop strings"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_before_any_work(tiny_llm):
    computed = tiny_llm.num_prefill_tokens_computed
    with pytest.raises(ValueError, match="maximum length is 1024"):
        tiny_llm.generate(["fine", [5] * 1024], SamplingParams(max_tokens=4))
    # Offline, an output that does not fit ends at the model's length; a server may refuse it.
    assert tiny_llm.make_sequence([5] * 1000, SamplingParams(max_tokens=24)).num_prompt_tokens == 1000
    with pytest.raises(ValueError, match="max_tokens is 25, .* at most 24 output tokens fit"):
        tiny_llm.make_sequence([5] * 1000, SamplingParams(max_tokens=25), max_tokens_must_fit=True)
    with pytest.raises(ValueError, match="token ids must be integers in \\[0, 512\\)"):
        tiny_llm.generate([[1, 2, 512]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate([[]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="stop_token_ids"):
        tiny_llm.generate("ok", SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(TypeError, match="a prompt is a text or a list of token ids, not NoneType"):
        tiny_llm.generate(["fine", None])
    with pytest.raises(TypeError, match="sampling params must be a SamplingParams, not dict"):
        tiny_llm.generate(["fine"], {"max_tokens": 2})
    assert not tiny_llm.has_unfinished()
    assert tiny_llm.num_prefill_tokens_computed == computed


def test_a_tokenizer_beyond_the_models_vocabulary_is_named_before_any_work(checkpoint):
    edit_config(checkpoint, vocab_size=40)
    llm = LLM(str(checkpoint), load_format="dummy", tokenizer="tiny", num_kv_blocks=64)
    with pytest.raises(ConfigError, match="beyond the model's vocabulary of 40: it is not this model's tokenizer"):
        llm.generate("a text the tiny tokenizer spells with ids past 40")
    assert not llm.has_unfinished()


def test_text_prompt_without_tokenizer(good_checkpoint):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        LLM(str(good_checkpoint), num_kv_blocks=64).generate("hello")


def test_cli_reports_errors_with_exit_status_2(checkpoint):
    edit_config(checkpoint, architectures=["FooForCausalLM"])
    run = subprocess.run([sys.executable, "-m", "kairos.cli", "generate", "--model", str(checkpoint),
                          "--prompt", "hi"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "unknown architecture" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "kairos.cli", "generate", "--prompt", "hi", "--top-p", "2"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "top_p must be in (0, 1]" in run.stderr


def test_backend_choice(monkeypatch):
    from kairos.kernels import get_backend

    assert get_backend("auto", "cpu").name == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend 'cuDNN'"):
        get_backend("cuDNN", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_backend("triton", "cpu")


def kairos_main(argv: list[str], capsys) -> tuple[int, str]:
    """`kairos ARGV` in this process: its exit status (argparse's errors too) and its stderr."""
    from kairos.cli.main import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def busy_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["status", "--timeout", "-1"], "--timeout: must be a positive number"),
    (["client", "--timeout", "0", "hi"], "--timeout: must be a positive number"),
    (["generate", "--prompt", "hi", "--max-model-len", "-5"], "--max-model-len must be at least 2"),
    (["generate", "--prompt", "hi", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["simulate", "--limit", "-3"], "--limit: must be at least 1"),
    (["serve", "--prefill-memory-share", "0"], "--prefill-memory-share: must be between 0 and 1"),
    (["serve", "--api-key", "k"], "give --http-port too"),
    (["router", "--worker-timeout", "0.1"], "--worker-timeout must be at least 0.5 s"),
    (["profile", "--out", "/nonexistent/profile.json"], "--out /nonexistent/profile.json: cannot write there"),
    (["profile", "--out", "/tmp"], "--out /tmp is a folder: give the file's path"),
    (["simulate", "--trace-format", "synthetic", "--synthetic-requests", "0"], "--synthetic-requests: must be"),
    (["prefill", "--step-log", "/nonexistent/steps.jsonl"], "--step-log /nonexistent/steps.jsonl: cannot write"),
    (["bench", "compare", "--limit", "20", "--out-dir", "/proc/kairos"], "--out-dir /proc/kairos"),
    (["bench", "replay", "--api-key", "k", "--limit", "2"], "--model and --api-key are for --http"),
    (["api", "--model", "/nonexistent"], "--model /nonexistent: no such model folder"),
    (["generate", "--prompt", "hi", "--num-kv-blocks", "100000000"], "not enough memory for the weights, KV cache"),
    (["serve", "--model", "/nonexistent", "--port", "0"], "model folder /nonexistent does not exist"),
    (["bench", "compare", "--rate-scales", "2,,3"], "--rate-scales: must be a number, not ''"),
    (["bench", "replay", "--http", "notaurl", "--limit", "2"], "--http takes the API's URL"),
    (["bench", "replay", "--addr", "tcp://127.0.0.1:1", "--http", "http://x", "--limit", "2"], "exclude each other"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_command_lines_stop_with_one_line_and_status_2_before_any_work(argv, message, capsys):
    code, err = kairos_main(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("command, flag", [("serve", "--port"), ("api", "--port"), ("router", "--metrics-port")])
def test_a_port_another_server_holds_is_refused_before_anything_starts(command, flag, busy_port, capsys):
    code, err = kairos_main([command, flag, str(busy_port)], capsys)
    assert code == 2 and f"{flag} {busy_port}: cannot listen" in err


@pytest.mark.parametrize("profile", [[], {}, {"fit": {"prefill": [1, 2], "decode": [1, 2, 3]}}, {"fit": "x"}])
def test_a_file_that_is_not_a_step_time_profile_is_named_as_such(profile, tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    for argv in (["simulate", "--limit", "5", "--profile", str(path)],
                 ["generate", "--prompt", "hi", "--prefill-policy", "kairos", "--profile", str(path)]):
        code, err = kairos_main(argv, capsys)
        assert code == 2 and "not a step-time profile" in err, err


def test_status_of_a_router_with_no_workers_says_so(capsys):
    from kairos.cli.report import print_status

    print_status({"counters": {"submitted": 0}, "pending": 0, "workers": []})
    assert "(no workers registered)" in capsys.readouterr().out


def test_a_kv_frame_under_one_block_is_refused_with_the_blocks_size(capsys):
    code, err = kairos_main(["decode", "--model", "tiny", "--kv-frame-mb", "0.0001", "--router", "tcp://127.0.0.1:1"],
                            capsys)
    assert code == 2 and "--kv-frame-mb allows frames of 104 bytes, less than one KV block of one layer" in err
