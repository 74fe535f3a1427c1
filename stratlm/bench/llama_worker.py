"""llama.cpp (llama-cpp-python) as a benchmark engine, in its own process.

Run as a script, `python llama_worker.py MODEL.gguf THREADS`: it imports neither stratlm nor
MLX, so llama.cpp's threads compete with nothing of ours. It prints one JSON line when loaded,
then answers each request line ({"prompt": [...], "max_tokens": n}) with a Measurement's fields
as one JSON line. Greedy (argmax of the logits), EOS ignored, the prompt's ids as given (no BOS
added), the KV cache cleared before every run: the same work stratlm's greedy run does.
prefill tok/s = prompt tokens / time to the first token; decode tok/s = tokens after the first /
time after the first (as the other engines measure it).
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    import numpy as np
    from llama_cpp import Llama

    path, threads = argv[0], int(argv[1])
    n_ctx = int(argv[2]) if len(argv) > 2 else 4096
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512, verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        # the last evaluated position's logits (llm.scores is only filled with logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    print(json.dumps({"ready": True, "threads": threads}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prompt, max_tokens = list(request["prompt"]), int(request["max_tokens"])
        if request.get("batch", 1) != 1:
            print(json.dumps({"error": "the llama.cpp baseline decodes one row"}), flush=True)
            continue
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = [next_token()]
        first = time.perf_counter()
        while len(tokens) < max_tokens:
            llm.eval([tokens[-1]])
            tokens.append(next_token())
        end = time.perf_counter()
        decode_time = end - first
        print(json.dumps({
            "prompt_tps": len(prompt) / (first - start),
            "decode_tps": (len(tokens) - 1) / decode_time if decode_time > 0 else 0.0,
            "wall_s": end - start,
            "tokens": len(tokens),
            "peak_gb": 0.0,  # llama.cpp's memory is not MLX's: not measured
            "token_ids": tokens,
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
