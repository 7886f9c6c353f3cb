"""The precision check for a lent GPU: bf16 against float32 on random models built from configs (no tokenizer, no
hub, only torch and transformers beside afprobe), the way `bench_precision.py` does it on the embedded model.

For each family a bf16 model and its float32 twin with the very same weights score the same token rows through
the prefix-shared forward; printed per family:
  - the largest logit, and the error of the log-odds between two tokens against the float32 twin, with the float32
    readout and with the model's own bf16 logits (RMS over rows);
  - whether those log-odds sit on the bf16 grid (the naive way should; afprobe's readout should not);
  - `float32_compute` against the float32 twin (should be ~0: the same arithmetic on the same weights);
  - seconds per forward of a batch: float32 model, bf16 with the float32 readout, bf16 plain.

    PYTHONPATH=src python benchmarks/gpu_check_precision.py --device cuda [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from unittest import mock

import torch

from afprobe.model import precision
from afprobe.model.forward import compute_prefix_cache, extend_batch, start_batch


def config(family: str, vocab: int):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=8192,
    )
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if family == "gemma3":
        return Gemma3TextConfig(head_dim=64, sliding_window=512, **common)
    return classes[family](**common)


def twins(family: str, vocab: int, device: torch.device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = config(family, vocab)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # logits of tens of nats, like a trained model's
        model.get_output_embeddings().weight.mul_(150.0)
    bf16 = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16).eval()
    fp32 = copy.deepcopy(bf16).to(torch.float32).eval()
    return bf16, fp32


def log_odds(model, prefix_ids: list[int], rows: list[list[int]], a: int, b: int) -> tuple[torch.Tensor, float]:
    """Log-odds of token a over token b after each row (prefix-shared), and seconds per batch forward."""
    prefix = compute_prefix_cache(model, prefix_ids)
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    keep = [[len(r) - 1] for r in rows]
    extend_batch(model, start_batch(prefix, len(rows)), rows, keep)  # warm-up, not timed
    sync()
    start = time.perf_counter()
    logits, _, _ = extend_batch(model, start_batch(prefix, len(rows)), rows, keep)
    sync()
    seconds = time.perf_counter() - start
    last = torch.stack([row[-1] for row in logits]).float()
    logp = torch.log_softmax(last, dim=-1)
    return (logp[:, a] - logp[:, b]).cpu(), seconds


def on_bf16_grid(values: torch.Tensor) -> float:
    steps = values.double() * 1024
    return float(((steps - steps.round()).abs() < 0.02).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", default="llama,qwen2,mistral,gemma3")
    parser.add_argument("--prefix", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(1)
    prefix_ids = torch.randint(10, args.vocab, (args.prefix,), generator=generator).tolist()
    rows = [torch.randint(10, args.vocab, (100,), generator=generator).tolist() for _ in range(args.rows)]

    report = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"), "families": {}}
    for family in args.families.split(","):
        bf16, fp32 = twins(family, args.vocab, device)
        a, b = 5, 6
        exact, t32 = log_odds(fp32, prefix_ids, rows, a, b)
        read, tread = log_odds(bf16, prefix_ids, rows, a, b)
        with precision.float32_compute(bf16):
            emulated, _ = log_odds(bf16, prefix_ids, rows, a, b)
        with mock.patch.object(precision, "needs_float32_readout", lambda model: False):
            plain, tplain = log_odds(bf16, prefix_ids, rows, a, b)
        row = {
            "rms_error_float32_readout": float((read - exact).pow(2).mean().sqrt()),
            "rms_error_bf16_logits": float((plain - exact).pow(2).mean().sqrt()),
            "on_bf16_grid_float32_readout": on_bf16_grid(read),
            "on_bf16_grid_bf16_logits": on_bf16_grid(plain),
            "float32_compute_max_error": float((emulated - exact).abs().max()),
            "seconds_per_batch": {"float32": t32, "bf16_float32_readout": tread, "bf16_logits": tplain},
        }
        report["families"][family] = row
        print(family, json.dumps(row))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check_precision.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
