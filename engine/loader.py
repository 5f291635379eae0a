"""Weight loading from Hugging Face safetensors (single file or sharded), or dummy weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from kairos.engine.config import ConfigError
from kairos.engine.model import CausalLM

# Buffers some checkpoints carry that the engine recomputes itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise ConfigError(f"{index.name} in {path} names weight files that are missing: {missing}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {path} (use --load-format dummy for random weights)")
    return files


def load_weights(model: CausalLM, path: Path) -> None:
    """Copies every checkpoint tensor into the model; errors name any missing, unexpected or
    mis-shaped tensor."""
    params = dict(model.named_parameters())
    pending = set()  # (parameter, shard) pairs not yet loaded; shard is None for whole tensors
    for name in params:
        packed = name.split(".")[-2]
        if packed in ("qkv_proj", "gate_up_proj"):
            pending.update((name, i) for i in range(len(model.shard_sizes(packed))))
        else:
            pending.add((name, None))
    unexpected = []
    for file in weight_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if hf_name.endswith(IGNORED_SUFFIXES):
                    continue
                if hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue
                target, shard = _target(hf_name)
                if target not in params:
                    unexpected.append(hf_name)
                    continue
                _copy(model, params[target], target, shard, f.get_tensor(hf_name), hf_name, file)
                pending.discard((target, shard))
    if model.config.tie_word_embeddings:
        pending.discard(("lm_head.weight", None))
    if unexpected:
        raise ConfigError(f"checkpoint in {path} has tensors this {model.config.architecture} "
                          f"does not use: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if pending:
        names = sorted(_hf_name(name, shard) for name, shard in pending)
        raise ConfigError(f"checkpoint in {path} is missing tensors: {names[:8]}"
                          f"{' ...' if len(names) > 8 else ''}")


def _hf_name(param_name: str, shard: int | None) -> str:
    if shard is None:
        return param_name
    parts = param_name.split(".")
    hf = next(k for k, v in CausalLM.PACKED.items() if v == (parts[-2], shard))
    return ".".join(parts[:-2] + [hf, parts[-1]])


def _target(hf_name: str) -> tuple[str, int | None]:
    parts = hf_name.split(".")
    if len(parts) >= 2 and parts[-2] in CausalLM.PACKED:
        packed, shard = CausalLM.PACKED[parts[-2]]
        return ".".join(parts[:-2] + [packed, parts[-1]]), shard
    return hf_name, None


@torch.no_grad()
def _copy(model, param, name, shard, tensor, hf_name, file):
    if shard is None:
        dest = param
    else:
        sizes = model.shard_sizes(name.split(".")[-2])
        dest = param.narrow(0, sum(sizes[:shard]), sizes[shard])
    if tuple(dest.shape) != tuple(tensor.shape):
        raise ConfigError(f"{hf_name} in {file.name} has shape {list(tensor.shape)}, "
                          f"but config.json implies {list(dest.shape)}")
    dest.copy_(tensor)


@torch.no_grad()
def init_dummy_weights(model: CausalLM, seed: int = 0) -> None:
    """Small random weights (norm gains of one) for timing real shapes without a checkpoint."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.uniform_(-1e-3, 1e-3, generator=gen)
