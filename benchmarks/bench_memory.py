"""The memory estimate printed before a run (`afprobe.model.memory`) against the measured peak, in one run.

For each batch size a fresh child process loads the model, then runs what a caching or gap job runs: the shared
prefix once, then one batch of the longest prompts (stage 1 and both answer continuations). Measured:

- on a GPU: `torch.cuda.max_memory_allocated` over what was allocated once the weights were in;
- on the CPU: the peak resident set (`VmHWM`, reset through `/proc/self/clear_refs` after loading) over the
  resident set after loading. glibc is told to hand large blocks back to the OS on free
  (`MALLOC_MMAP_THRESHOLD_`), so the resident set follows the live tensors.

Both are compared with the estimate's `job` bytes (prefix cache + the larger of the prefix forward and the batch):
the part of the peak that the estimate predicts, the weights being measured, not estimated.

    python benchmarks/bench_memory.py --batch-sizes 1,4,8            # embedded model, CPU
    python benchmarks/bench_memory.py --model meta-llama/Llama-3.1-8B-Instruct --device cuda --batch-sizes 1,16,64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import gc, json, sys
import torch
from afprobe.data.query_sets import load_queries
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.readout import AnswerTokens, plan_batch_size, score_batch
from afprobe.model.loading import load_model
from afprobe.data.prompts import PromptConfig, render_pairs

args = json.loads(sys.argv[1])
loaded = load_model(args["model"], device=args["device"], dtype=args["dtype"])
batch = args["batch_size"]
prompt_set = render_pairs(loaded.tokenizer, load_queries("harmful", n=max(4, batch)), PromptConfig(),
                          max_context=loaded.max_context or None)
prompts = sorted(prompt_set.prompts, key=lambda p: -p.n_tokens)[:batch]
answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
prefix_len = min(prompt_set.shared_prefix_len, min(p.n_tokens for p in prompts) - 1)
estimate, _ = plan_batch_size(loaded.model, prompts, prefix_len, answers, batch)
cuda = loaded.device.type == "cuda"

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

gc.collect()
if cuda:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
else:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    base = status("VmRSS")
prefix = compute_prefix_cache(loaded.model, prompts[0].input_ids[:prefix_len])
score_batch(loaded.model, prefix, prompts, answers, pad_id=loaded.tokenizer.pad_token_id or 0)
if cuda:
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    peak = status("VmHWM") - base
print(json.dumps({"batch_size": batch, "prefix_tokens": prefix_len, "estimate": estimate.to_dict(),
                  "measured_job": peak, "device": str(loaded.device)}))
"""


def measure(model: str, device: str, dtype: str, batch_size: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    payload = json.dumps({"model": model, "device": device, "dtype": dtype, "batch_size": batch_size})
    result = subprocess.run([sys.executable, "-c", _CHILD, payload], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child for batch {batch_size} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)

    rows = []
    print(f"{'batch':>5} {'prefix':>7} {'estimate MiB':>13} {'measured MiB':>13} {'ratio':>6}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        row = measure(args.model, args.device, args.dtype, batch)
        row["ratio"] = row["estimate"]["job"] / row["measured_job"]
        rows.append(row)
        print(
            f"{batch:>5} {row['prefix_tokens']:>7} {row['estimate']['job'] / 2**20:>13.1f} "
            f"{row['measured_job'] / 2**20:>13.1f} {row['ratio']:>6.3f}"
        )
    print(f"device {rows[0]['device']}; weights {rows[0]['estimate']['weights'] / 2**30:.2f} GiB (not estimated)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
