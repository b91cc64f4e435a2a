"""The dashboard's throughput check, run headless with Streamlit's AppTest (for a GPU box).

    python bench/app_throughput_check.py --json bench/results/app_throughput_h200.json
    python bench/app_throughput_check.py --preset tiny --device cpu      # smoke test of the mechanics

Saves a random Llama (``--preset``: ``1b`` = hidden 2048, 16 layers, MLP 5504, vocab 32000) with
an offline byte-level tokenizer in a temporary directory, opens the app on it (Evaluate tab,
sparsity 0.5), clicks "Measure throughput" exactly as a user would, and prints the rows the tab
shows: decode tokens/s with its spread over the repeats, the speed-up over dense and the path that
ran (on CUDA: the fused step with the sparse kernels). The rows are also written as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import byte_tokenizer

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
PRESETS = {
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        config = LlamaConfig(max_position_embeddings=2048, **PRESETS[args.preset])
        model = LlamaForCausalLM(config).to(torch.bfloat16 if args.device != "cpu" else torch.float32)
        model.save_pretrained(folder, safe_serialization=True)
        byte_tokenizer().save_pretrained(folder)
        del model
        at = AppTest.from_file(APP, default_timeout=900)
        for key, value in dict(model="local directory", path=folder, sparsity=args.sparsity, tab="Evaluate",
                               device=args.device).items():
            at.query_params[key] = value
        at.run()
        problems = [e.value for e in at.exception] + [e.value for e in at.error]
        if problems:
            raise SystemExit(f"the app failed to open: {problems}")
        at.button(key="run_throughput").click().run()
        problems = [e.value for e in at.exception] + [e.value for e in at.error]
        if problems:
            raise SystemExit(f"the throughput check failed: {problems}")
        rows = at.session_state["latest_run"]
    keys = ("label", "decode_tokens_per_s", "decode_runs", "decode_speedup", "decode_path", "prefill_tokens_per_s",
            "prompt_len", "new_tokens", "device")
    table = [{k: row.get(k) for k in keys} for row in rows]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"dashboard throughput check: random Llama {args.preset} on {name}, sparsity {args.sparsity}")
    print(f"{'label':<28} | {'decode tok/s':>12} | {'min':>8} | {'max':>8} | {'vs dense':>8} | {'path':<13} | "
          "prefill tok/s")
    for row in table:
        runs = row["decode_runs"] or [float("nan")]
        print(f"{row['label']:<28} | {row['decode_tokens_per_s']:12.1f} | {min(runs):8.1f} | {max(runs):8.1f} | "
              f"{row['decode_speedup']:7.2f}x | {row['decode_path']:<13} | {row['prefill_tokens_per_s']:.1f}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"gpu": name, "preset": args.preset, "rows": table}, indent=1, default=str))
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
