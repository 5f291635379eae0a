"""Teacher-forced agreement with transformers in reduced precision (bf16 by default).

Builds a random-weight checkpoint of a real model shape with transformers, loads it into both
transformers and Kairos in the chosen dtype, feeds both the same token sequences, and compares
the logits at every position: top-1 agreement and logit error. Both are also compared with
transformers in float32, which shows how much of any disagreement is the dtype's own rounding.

  python -m kairos.bench.bf16_parity --device cuda --shape bench/models/Qwen3-0.6B
  python -m kairos.bench.bf16_parity --device cpu --layers 2 --lengths 33,100      # quick CPU run
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from kairos.bench.common import device_name, write_result
from kairos.engine import LLM
from kairos.engine.config import DTYPES
from kairos.scheduler.defaults import BLOCK_SIZE


@torch.no_grad()
def hf_logits(hf, prompts, device) -> list[torch.Tensor]:
    return [hf(torch.tensor([p], device=device)).logits[0].float() for p in prompts]


def compare(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
    """Top-1 agreement over all positions, and logit errors relative to the reference's scale."""
    total = sum(len(r) for r in ref)
    agree = sum((o.argmax(-1) == r.argmax(-1)).sum().item() for o, r in zip(ours, ref))
    max_err = max(((o - r).abs().max() / r.abs().max()).item() for o, r in zip(ours, ref))
    mean_err = sum(((o - r).abs().mean() / r.abs().max()).item() * len(r) for o, r in zip(ours, ref)) / total
    return {"top1_agreement": agree / total, "max_logit_error_rel": max_err, "mean_logit_error_rel": mean_err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bench/models/Qwen3-0.6B", help="folder with a config.json")
    ap.add_argument("--layers", type=int, help="override the layer count (faster runs)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="17,128,500,1000")
    args = ap.parse_args()
    import transformers

    config = json.loads((Path(args.shape) / "config.json").read_text())
    if args.layers:
        config["num_hidden_layers"] = args.layers
    dtype = getattr(torch, args.dtype)
    lengths = [int(n) for n in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        with torch.no_grad():  # transformers leaves norm gains at one; vary them too
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.1 * torch.randn_like(p))
        hf.save_pretrained(tmp)
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, hf_config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
        hf = hf.to(args.device).eval()
        truth = hf_logits(hf, prompts, args.device)  # float32: the yardstick for both
        hf_low = hf_logits(hf.to(dtype), prompts, args.device)
        del hf
        llm = LLM(tmp, dtype=args.dtype, device=args.device, max_model_len=max(lengths) + 1,
                  num_kv_blocks=sum(-(-n // BLOCK_SIZE) for n in lengths) + 8)
        ours = llm.prompt_logits(prompts)
    result = {"device": device_name(torch.device(args.device)), "dtype": args.dtype,
              "shape": Path(args.shape).name, "layers": config["num_hidden_layers"],
              "transformers": transformers.__version__, "lengths": lengths,
              "kairos_vs_transformers": compare(ours, hf_low),
              "kairos_vs_float32": compare(ours, truth),
              "transformers_vs_float32": compare(hf_low, truth)}
    print(json.dumps(result, indent=2))
    print(f"wrote {write_result(f'bf16_parity_{Path(args.shape).name}_{torch.device(args.device).type}', result)}")


if __name__ == "__main__":
    main()
