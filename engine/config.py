"""Model and engine configuration, read from a Hugging Face model folder and the command line.

Torch is imported only where a value needs it, so that the command line can build its flags
from EngineConfig without loading it."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kairos.kernels import BACKENDS
from kairos.scheduler import DECODE_POLICIES, PREFILL_POLICIES
from kairos.scheduler.defaults import BLOCK_SIZE, MAX_BATCH, TOKEN_BUDGET

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = {"default", "llama3", "linear"}
DTYPES = ("float32", "float16", "bfloat16")  # torch dtypes by name
ROLES = ("offline", "prefill", "decode")


class ConfigError(ValueError):
    """A model folder or an engine setting that Kairos cannot run."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    checkpoint_dtype: str  # one of DTYPES
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        config_file = path / "config.json"
        if not path.is_dir():
            raise ConfigError(f"model folder {path} {'is a file, not a folder' if path.exists() else 'does not exist'}")
        if not config_file.exists():
            raise ConfigError(f"{path} has no config.json: not a Hugging Face model folder")
        cfg = _read_json(config_file)
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"unknown architecture {archs or cfg.get('model_type')!r} in {config_file}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")

        num_heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = _rope_settings(cfg)
        sliding_window = cfg.get("sliding_window")
        if not cfg.get("use_sliding_window", arch == "MistralForCausalLM"):
            sliding_window = None  # Qwen configs carry a window size they do not use
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            path=path,
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always carries a q/k/v bias; Llama-style configs say so with attention_bias.
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=arch != "Qwen2ForCausalLM" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            checkpoint_dtype=_checkpoint_dtype(cfg),
            sliding_window=sliding_window,
            eos_token_ids=_eos_token_ids(path, cfg),
        )


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    # transformers 5 nests the theta inside rope_parameters; older configs keep rope_theta and
    # rope_scaling at the top level.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope type {rope_type!r} is not supported; supported: {sorted(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return float(theta), scaling


def _checkpoint_dtype(cfg: dict) -> str:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ConfigError(f"checkpoint dtype {name!r} is not supported; supported: {list(DTYPES)}")
    return name


def _eos_token_ids(path: Path, cfg: dict) -> tuple[int, ...]:
    gen_file = path / "generation_config.json"
    eos = None
    if gen_file.exists():
        eos = _read_json(gen_file).get("eos_token_id")
    if eos is None:
        eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def setting(default, help: str, flag: str | None = None, choices=None, command_line: bool = True):
    """An EngineConfig field, with what its command-line flag needs (`kairos.cli.engine_flags`
    makes `--name-with-dashes` of it, or `flag`)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                            "command_line": command_line})


@dataclass
class EngineConfig:
    """Everything the engine needs besides the weights. Defaults suit the current device. Each
    field is also a flag of the commands that run an engine: a new setting is a new field."""

    model: str = setting("tiny", "Hugging Face model folder, or 'tiny' (built in)")
    tokenizer: str | None = setting(None, "folder with tokenizer.json, if not the model's own")
    dtype: str = setting("auto", "weights and activations (auto: the checkpoint's on GPU, float32 on CPU)",
                         choices=("auto", *DTYPES))
    device: str = setting("auto", "cpu, cuda or auto")
    load_format: str = setting("auto", "dummy: random weights from config.json alone, for benchmarking shapes",
                               choices=("auto", "dummy"))
    backend: str = setting("auto", "kernels: auto is triton on CUDA, torch (the PyTorch reference) elsewhere; "
                           "flashinfer is FlashInfer's attention, on CUDA where it is installed",
                           choices=BACKENDS)
    skinny_matmul_tokens: int = setting(0, "steps of at most this many tokens (decode steps) run their projections "
                                           "on the Triton skinny matmul, with the MLP's activation and the "
                                           "blocks' norms fused into it, instead of torch's (cuBLAS); 0: never. "
                                           "bench/matmul.py times both")
    enforce_eager: bool = setting(False, "decode without CUDA graphs (by default captured at start-up on CUDA)")
    overlap: str = setting("auto", "schedule and prepare each decode step while the device runs the last one "
                                   "(auto: on CUDA, where steps run asynchronously)", choices=("auto", "on", "off"))
    block_size: int = setting(BLOCK_SIZE, "tokens per KV block")
    num_kv_blocks: int | None = setting(None, "KV cache size in blocks (default: from memory)")
    gpu_memory_utilization: float = setting(0.9, "share of GPU memory for weights, activations and KV cache")
    cpu_kv_cache_gb: float = setting(1.0, "KV cache size on CPU, GiB (without --num-kv-blocks)")
    max_num_seqs: int = setting(MAX_BATCH, "sequences per step")
    max_num_batched_tokens: int = setting(TOKEN_BUDGET, "tokens per step (longer prompts are prefilled in chunks)")
    max_model_len: int | None = setting(None, "longest sequence, prompt and output (default: the model's)")
    enable_prefix_caching: bool = setting(True, "reuse the KV of shared prompt prefixes",
                                          flag="--no-prefix-caching")
    seed: int = setting(0, "seeds dummy weights and unseeded sampling", command_line=False)
    prefill_policy: str = setting("fcfs", f"order of waiting prompts: {PREFILL_POLICIES.describe()}",
                                  choices=tuple(PREFILL_POLICIES))
    decode_policy: str = setting("cb", f"who joins the decode batch: {DECODE_POLICIES.describe()}",
                                 choices=tuple(DECODE_POLICIES))
    max_prefill_wait_s: float | None = setting(
        None, "a prompt the prefill policy demoted (kairos, mh, tempo: predicted to miss its TTFT) goes first once it "
              "has waited this long, oldest first, so that none waits without bound behind a steady stream of "
              "prompts still in time; it costs TTFT attainment (default: no limit)")
    profile: str | None = setting(None, "step-time profile (kairos profile) for the cost model; without one, "
                                        "predicting policies measure a short one at start-up")
    # offline: whole requests here; prefill: each request's prompt, then its KV goes to a decode
    # worker; decode: requests whose prompt KV arrives from a prefill worker.
    role: str = setting("offline", "what this engine serves", choices=ROLES, command_line=False)

    def __post_init__(self):
        import torch

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be auto or one of {list(DTYPES)}, not {self.dtype!r}")
        if self.overlap not in ("auto", "on", "off"):
            raise ConfigError(f"--overlap must be auto, on or off, not {self.overlap!r}")
        if self.overlap == "auto":
            self.overlap = "on" if self.device.startswith("cuda") else "off"
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"--load-format must be auto or dummy, not {self.load_format!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, not {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.skinny_matmul_tokens < 0:
            raise ConfigError("--skinny-matmul-tokens must be 0 (off) or more")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("--num-kv-blocks must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("--max-model-len must be at least 2 (a prompt token and an output token)")
        if self.cpu_kv_cache_gb <= 0:
            raise ConfigError("--cpu-kv-cache-gb must be positive")
        if self.max_prefill_wait_s is not None and not self.max_prefill_wait_s > 0:
            raise ConfigError(f"--max-prefill-wait-s must be positive, not {self.max_prefill_wait_s}")
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, not {self.role!r}")

    def torch_dtype(self, model_config: ModelConfig) -> torch.dtype:
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        # CPU matmuls in half precision are slow and less exact: CPU defaults to float32.
        return torch.float32 if self.device == "cpu" else getattr(torch, model_config.checkpoint_dtype)

    def resolve_max_model_len(self, model_config: ModelConfig) -> int:
        limit = model_config.max_position_embeddings
        if model_config.sliding_window and model_config.sliding_window < limit:
            # Sliding-window attention is not implemented: stay within one window, where it
            # equals full attention.
            limit = model_config.sliding_window
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ConfigError(
                f"--max-model-len {self.max_model_len} exceeds the model's limit of {limit} tokens"
            )
        return self.max_model_len
