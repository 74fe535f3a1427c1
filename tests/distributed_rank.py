"""One process of tests/test_distributed.py's groups (run as a script with MLX_HOSTFILE and MLX_RANK set,
as mlx.launch sets them), and the model exercise whose logits the test compares with one process's.

usage: python distributed_rank.py SPEC.json   (SPEC: {"runs": [{"model", "parallel", "out"}, ...]})
Each run loads the model split over the group; rank 0 writes the exercise's logits to `out`
(a run with "submit": a list of requests also runs them through Engine.submit, see `submit_all`).
       python distributed_rank.py --hold MODEL PARALLEL
decodes for ever (rank 0 prints "decoding" once it has), for killing a rank; errors print one line.
"""

from __future__ import annotations

import json
import sys

import stratlm  # noqa: F401  (the optimized BLAS before mlx.core)
import mlx.core as mx
import numpy as np


def exercise(model) -> dict[str, np.ndarray]:
    """Logits through the Model interface the strategies use: no cache; a cached prompt in two chunks
    then single steps; a left-padded batch decoded with a trim (a rejected draft) and a row filter."""
    out = {}
    tokens = mx.array([[5, 17, 99, 3, 250, 42, 7, 11], [60, 61, 62, 63, 64, 65, 66, 67]], dtype=mx.int32)
    out["nocache"] = model(tokens)
    cache = model.make_cache()
    steps = [model(tokens[:1, :5], cache), model(tokens[:1, 5:], cache)]
    for t in (9, 200, 31):
        steps.append(model(mx.array([[t]], dtype=mx.int32), cache))
    out["cached"] = mx.concatenate(steps, axis=1)
    cache = model.make_cache(left_padding=[0, 3, 1])
    batch = mx.array([[1, 2, 3, 4, 5, 6], [0, 0, 0, 7, 8, 9], [0, 10, 11, 12, 13, 14]], dtype=mx.int32)
    rows = [model(batch, cache)]
    rows.append(model(mx.array([[20, 21, 22], [23, 24, 25], [26, 27, 28]], dtype=mx.int32), cache))
    for c in cache:
        c.trim(2)  # keep one of the three drafted positions
    rows.append(model(mx.array([[30], [31], [32]], dtype=mx.int32), cache))
    for c in cache:
        c.filter([2, 0])  # row 1 finished
    last = model(mx.array([[40], [41]], dtype=mx.int32), cache)
    out["batch"] = mx.concatenate(rows, axis=1)
    out["filtered"] = last
    mx.eval(out)
    return {k: np.array(v.astype(mx.float32)) for k, v in out.items()}


def submit_all(loaded, requests: list[dict], out: str) -> None:
    """Requests through an Engine on the split model, each {"prompt", "max_tokens", "strategy"?}:
    one after another with submit, then all at once from threads (submit, stream, and the direct
    generate taking its turn with them). Their token ids (text for stream) go to `out` as JSON."""
    import threading

    from stratlm import Engine

    engine = Engine(loaded)

    def kwargs(r: dict) -> dict:
        return dict(max_tokens=r["max_tokens"], ignore_eos=True, chat_template=False)

    got: dict[str, object] = {}
    for i, r in enumerate(requests):
        got[f"seq{i}"] = list(engine.submit(r["prompt"], strategy=r.get("strategy"), **kwargs(r)).result().token_ids)
    ways = {
        "submit": lambda r: list(engine.submit(r["prompt"], strategy=r.get("strategy"), **kwargs(r)).result().token_ids),
        "stream": lambda r: "".join(engine.stream(r["prompt"], **kwargs(r))),
        "generate": lambda r: list(engine.generate(r["prompt"], **kwargs(r)).token_ids),
    }
    errors: list[BaseException] = []

    def one(name: str, way, r: dict) -> None:
        try:
            got[name] = way(r)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(f"{way}{i}", ways[way], r)) for i, r in enumerate(requests) for way in ways]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()  # its scheduler's thread ends here (the model is closed by the caller)
    if errors:
        raise errors[0]
    with open(out, "w") as f:
        json.dump(got, f)


def hold(model: str, parallel: str) -> None:
    from stratlm.core.errors import StratlmError
    from stratlm.distributed import load_parallel

    try:
        loaded = load_parallel(model, parallel, dtype="float32", tokenizer=False)
        loaded.model.watchdog.arm()  # as Engine.generate does: a wait on the group is bounded
        cache = loaded.model.make_cache()
        token = mx.argmax(loaded.model(mx.array([[1, 2, 3, 4]], dtype=mx.int32), cache)[:, -1], axis=-1)
        mx.eval(token)
        print("decoding", flush=True)
        while True:
            token = mx.argmax(loaded.model(token[:, None], cache)[:, -1], axis=-1)
            mx.eval(token)
            for c in cache:
                c.trim(1)  # stay at the same length: decode for ever without growing
    except StratlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    from stratlm.distributed import load_parallel

    if sys.argv[1] == "--hold":
        return hold(sys.argv[2], sys.argv[3])
    spec = json.loads(open(sys.argv[1]).read())
    loaded = None
    for run in spec["runs"]:
        if loaded is not None:
            loaded.model.close()
        loaded = load_parallel(run["model"], run["parallel"], dtype=run.get("dtype", "float32"), quantized=run.get("quantized"),
                               micro_batches=run.get("micro_batches"), exit_when_done=False, tokenizer="generate" in run or "submit" in run)
        if loaded is None:  # another rank: it served rank 0 until this run closed
            continue
        result = exercise(loaded.model)
        if "submit" in run:
            submit_all(loaded, run["submit"], run["out"] + ".json")
        if "generate" in run:
            from stratlm import Engine

            engine = Engine(loaded, strategy=run.get("strategy", "greedy"))
            results = engine.generate(run["generate"], max_tokens=run.get("max_tokens", 16), ignore_eos=True)
            results = results if isinstance(results, list) else [results]
            result["tokens"] = np.array([list(r.token_ids) for r in results])
        np.savez(run["out"], **result)
    if loaded is not None:
        loaded.model.close()


if __name__ == "__main__":
    main()
