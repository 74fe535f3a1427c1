"""Hugging Face transformers on a model folder: greedy, static cache, which makes generate()
torch.compile the decode step (mode reduce-overhead: CUDA graphs).

Usage: gpu_bench_hf.py FOLDER PROMPT_IDS_JSON NEW_TOKENS [--serve] -> one JSON line: decode tok/s
(tokens after the first over the time after the first, from runs of 1 and NEW tokens).
--serve: a benchmark worker (stratlm.bench.runner.Worker's protocol): after the warm-up, print
{"ready": true, ...}, then answer each request line {"prompt": [...], "max_tokens": n} with a
Measurement's fields (a run of 1 and a run of n tokens; peak_gb: torch's peak allocation), so the
caller can interleave these rounds with its own engine's.
"""

import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

folder, prompt, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script, uncompiled
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
model.generation_config.cache_implementation = "static"  # generate() then compiles the decode step itself (CUDA graphs)
ids = torch.tensor([prompt], device=device)  # the warm-up's and the one-shot mode's prompt


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def generate(n, ids=ids):
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    sync()
    return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()


for _ in range(3):  # compilation and CUDA graph capture
    generate(new)
if "--serve" in sys.argv:
    print(json.dumps({"ready": True, "compiled": getattr(model, "_compiled_call", None) is not None}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        request_ids, n = torch.tensor([request["prompt"]], device=device), request["max_tokens"]
        first_s = generate(1, request_ids)[0]
        total_s, tokens = generate(n, request_ids)
        peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
        print(json.dumps({"prompt_tps": len(request["prompt"]) / first_s, "decode_tps": (n - 1) / (total_s - first_s), "wall_s": total_s,
                          "tokens": len(tokens), "peak_gb": peak, "token_ids": tokens}), flush=True)
    sys.exit(0)
first = statistics.median(generate(1)[0] for _ in range(3))
runs = [generate(new) for _ in range(3)]
total = statistics.median(t for t, _ in runs)
print(json.dumps({"compiled": getattr(model, "_compiled_call", None) is not None, "decode_tps": (new - 1) / (total - first), "end_to_end_tps": new / total, "first_token_s": first, "tokens": runs[0][1][:16]}))
