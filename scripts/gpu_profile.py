"""Where a batch-1 decode step goes on the GPU, for stratlm and mlx-lm (run by gpu_bench.sh
with GPU_SCRIPT=scripts/gpu_profile.py): Python graph building, the host's encoding of the
built graph (the async_eval call), the wait for the device, and a pipelined step; and the CUDA
kernels of backends/cuda/fused.py against the plain MLX ops they replace. (Encoding on a worker thread
while the main thread builds the next graph, over a thread-unsafe stream, gained little and
crashed MLX twice in four runs: not pursued.)"""

from __future__ import annotations

import os
import sys
import time

import stratlm  # noqa: F401
import mlx.core as mx

from stratlm.backends.cuda.decoder import install
from stratlm.bench.models import bench_model, model_folder, prompt_tokens

MODEL = os.environ.get("GPU_BENCH_MODEL", "qwen3-0.6b-random")
N = int(os.environ.get("GPU_PROFILE_STEPS", 128))


def with_compile(setting, run):
    """run, called with STRATLM_COMPILE set to setting ("on", "off"; None: unset, the default)."""
    def call():
        os.environ.pop("STRATLM_COMPILE", None)
        if setting:
            os.environ["STRATLM_COMPILE"] = setting
        return run()
    return call


def steps(folder):
    """(name, make_cache, step over a cache) for stratlm's ordinary graph, its fused one and mlx-lm
    on folder's weights; stratlm's models are built here (same seed, same weights), since an
    Engine on CUDA puts the model it gets in the fused layout."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.models.cache import make_prompt_cache

    theirs, _ = mlx_lm_load(str(folder))
    plain = bench_model(MODEL, "bfloat16").model
    yield "stratlm-plain", plain.make_cache, lambda cache: (lambda t: plain(t, cache))
    fused = bench_model(MODEL, "bfloat16").model
    install(fused)  # what the Engine does on CUDA: the fused layout and decode path (the kernels)
    yield "stratlm-fused", fused.make_cache, lambda cache: (lambda t: fused(t, cache))
    # what the Engine decodes with on CUDA: the compiled step over the fused model, static caches
    from stratlm.core.cache import StaticKVCache
    from stratlm.decoding.loop import DECODE_RESERVE, CompiledStep

    def compiled_cache():
        fused.make_cache()  # takes the fused plan, as decode_forward does
        return [StaticKVCache(64 + DECODE_RESERVE) for _ in fused.layers]

    yield "stratlm", compiled_cache, lambda cache: (lambda t, step=CompiledStep(fused, cache): step(t)[:, None, :])
    yield "mlx-lm", lambda: make_prompt_cache(theirs), lambda cache: (lambda t: theirs(t, cache=cache))


def profile(name, step, prompt) -> str:
    """Times one engine's decode steps; prints and returns the line."""
    mx.eval(step(prompt))
    tok = mx.array([[5]], dtype=mx.int32)
    for _ in range(8):
        mx.eval(step(tok))
    build = enc = wait = 0.0
    for _ in range(N):
        t0 = time.perf_counter()
        out = mx.argmax(step(tok)[:, -1, :], axis=-1)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        out.item()
        t3 = time.perf_counter()
        build += t1 - t0; enc += t2 - t1; wait += t3 - t2
    # pipelined on one thread (what both engines do)
    t0 = time.perf_counter()
    nxt = mx.argmax(step(tok)[:, -1, :], axis=-1)
    mx.async_eval(nxt)
    for _ in range(N):
        cur = nxt
        nxt = mx.argmax(step(cur[:, None])[:, -1, :], axis=-1)
        mx.async_eval(nxt)
        cur.item()
    piped = (time.perf_counter() - t0) / N
    nxt.item()
    line = f"build {build / N * 1e3:.2f}  encode {enc / N * 1e3:.2f}  wait {wait / N * 1e3:.2f}  pipelined {piped * 1e3:.2f} ms ({1 / piped:.0f}/s)"
    print(f"{name:<13} {line}", flush=True)
    return line


def kernel_overhead():
    """Python cost of building one custom-kernel node vs one mx.add node."""
    if not mx.cuda.is_available():
        return
    k = mx.fast.cuda_kernel(name="plus_one", input_names=["a"], output_names=["out"],
                            source="auto i = cooperative_groups::this_grid().thread_rank(); if (i < a_shape[0]) out[i] = a[i] + (T)1;")
    a = mx.ones((1024,), mx.bfloat16)
    args = dict(template=[("T", mx.bfloat16)], grid=(1024, 1, 1), threadgroup=(256, 1, 1), output_shapes=[a.shape], output_dtypes=[a.dtype])
    t0 = time.perf_counter(); y = k(inputs=[a], **args)[0]; mx.eval(y); first = time.perf_counter() - t0
    assert mx.array_equal(y, a + 1).item()
    t0 = time.perf_counter()
    for _ in range(1000):
        y = k(inputs=[a], **args)[0]
    custom = (time.perf_counter() - t0) / 1000
    t0 = time.perf_counter()
    for _ in range(1000):
        y = a + 1
    plain = (time.perf_counter() - t0) / 1000
    print(f"cuda_kernel: first call {first * 1e3:.0f} ms, build a node {custom * 1e6:.1f} us (mx add: {plain * 1e6:.1f} us)", flush=True)
    # MLX copies a kernel's whole source into each node it builds and hashes it at each encode:
    # what a longer source (ours are 1-5 KB with the shared header) costs per node
    src = "auto i = cooperative_groups::this_grid().thread_rank(); if (i < a_shape[0]) out[i] = a[i] + (T)1;"
    for pad in (0, 4000):
        kp = mx.fast.cuda_kernel(name=f"plus_one_pad{pad}", input_names=["a"], output_names=["out"], source=f"/*{'x' * pad}*/\n" + src)
        mx.eval(kp(inputs=[a], **args)[0])
        builds, evals = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            y = a
            for _ in range(200):
                y = kp(inputs=[y], **args)[0]
            t1 = time.perf_counter()
            mx.eval(y)
            builds.append(t1 - t0); evals.append(time.perf_counter() - t1)
        print(f"cuda_kernel, source {len(src) + pad + 5} bytes: a chain of 200 nodes: build {min(builds) / 200 * 1e6:.1f} us/node, eval {min(evals) / 200 * 1e6:.1f} us/node", flush=True)


def attention_timing():
    """attention_cached over a cache's storage vs MLX's attention over slices of it (what the
    fused path did before), batch 1, bf16, 320 cached positions of 512: a chain of 200 layers'
    worth, build and evaluation per call."""
    if not mx.cuda.is_available():
        return
    from stratlm.backends.cuda import fused as F
    kb, vb = mx.random.normal((1, 8, 512, 128)).astype(mx.bfloat16), mx.random.normal((1, 8, 512, 128)).astype(mx.bfloat16)
    offs, starts = mx.array([319], dtype=mx.int32), mx.array([0], dtype=mx.int32)
    q = mx.random.normal((1, 16, 1, 128)).astype(mx.bfloat16)
    mx.eval(kb, vb, q)
    k, v = mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16), mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16)
    ways = {"attention_cached": lambda q: F.attention_cached(q, k, v, kb, vb, offs, starts, 0.088)[0].reshape(1, 16, 1, 128),
            "slices + sdpa": lambda q: mx.fast.scaled_dot_product_attention(q, kb[:, :, :320], vb[:, :, :320], scale=0.088)}
    for name, attend in ways.items():
        mx.eval(attend(q))
        builds, evals = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            y = q
            for _ in range(200):
                y = attend(y)
            t1 = time.perf_counter()
            mx.eval(y)
            builds.append(t1 - t0); evals.append(time.perf_counter() - t1)
        print(f"{name:<17} build {min(builds) / 200 * 1e6:.1f} us/call, eval {min(evals) / 200 * 1e6:.1f} us/call", flush=True)


def check_fused():
    """The CUDA kernels against the plain MLX ops they replace, and the fused forward against
    the model's ordinary forward, fp32 and bf16, prompt then decode steps, with left padding."""
    from stratlm.backends.cuda import fused as F
    from stratlm.core.model import Model

    mx.random.seed(1)
    for dtype in (mx.float32, mx.bfloat16):
        x, d = mx.random.normal((3, 5, 1024)).astype(dtype), mx.random.normal((3, 5, 1024)).astype(dtype)
        w = (1 + 0.1 * mx.random.normal((1024,))).astype(dtype)
        qkv = mx.random.normal((3, 5, (16 + 16) * 128)).astype(dtype)
        qn, kn = (1 + 0.1 * mx.random.normal((128,))).astype(dtype), (1 + 0.1 * mx.random.normal((128,))).astype(dtype)
        inv = mx.array([2.0 ** (-(i / 64) * 19.93) for i in range(64)], dtype=mx.float32)
        offs = mx.array([0, 7, 300], dtype=mx.int32)
        gu = mx.random.normal((3, 5, 2 * 3072)).astype(dtype)
        W = (0.03 * mx.random.normal((6144, 1024))).astype(dtype)
        W2 = (0.03 * mx.random.normal((3072, 2048))).astype(dtype)
        x1, d1 = x[:, :1], d[:, :1]  # 3 rows: the gemv kernels
        kb, vb = mx.random.normal((3, 8, 512, 128)).astype(dtype), mx.random.normal((3, 8, 512, 128)).astype(dtype)
        q1, q4, starts = mx.random.normal((3, 16, 1, 128)).astype(dtype), mx.random.normal((3, 16, 4, 128)).astype(dtype), mx.array([0, 2, 5], dtype=mx.int32)
        k4, v4 = mx.random.normal((3, 8, 4, 128)).astype(dtype), mx.random.normal((3, 8, 4, 128)).astype(dtype)
        kb2, vb2 = mx.random.normal((3, 8, 512, 128)).astype(dtype), mx.random.normal((3, 8, 512, 128)).astype(dtype)
        mx.eval(kb, vb, kb2, vb2)

        def attend(q, kb, vb):  # on CUDA it writes k4, v4 into kb, vb in place: the same values each run
            past = mx.array([305, 303, 300], dtype=mx.int32)  # RoPE offsets: each row's new positions in storage column 305
            return F.attention_cached(q, k4[:, :, : q.shape[2]], v4[:, :, : q.shape[2]], kb, vb, past, starts, 128 ** -0.5)

        def run_all():
            return (F.add_rms_norm(x, d, w, 1e-6), F.attention_heads(qkv, 16, 8, 128, inv, offs, q_norm=qn, k_norm=kn, rope_scale=0.5),
                    F.attention_heads(qkv, 16, 8, 128, inv, offs), F.swiglu(gu),
                    F.norm_gemv(x1, d1, w, 1e-6, W), F.norm_gemv(x1, None, w, 1e-6, W)[1], F.norm_gemv(x1, d1, w, 1e-6, W, swiglu=True),
                    F.gemv(x1, W, (3, 1, 6144)), F.gemv(gu[:, :1, :2048], W2, (3, 1, 3072)),
                    F.norm_gemv_heads(x1, d1, w, 1e-6, W[:4096], 16, 8, 128, inv, offs, q_norm=qn, k_norm=kn, rope_scale=0.5),
                    F.norm_gemv_heads(x1, None, w, 1e-6, W[:4096], 16, 8, 128, inv, offs)[1:],
                    F.norm_gemv_heads(x[:1, :4], d[:1, :4], w, 1e-6, W[:4096], 16, 8, 128, inv, offs[:1], q_norm=qn, k_norm=kn),
                    attend(q1, kb, vb), attend(q4, kb2[:, :, 1:], vb2[:, :, 1:]))  # a view of other storage

        cuda = run_all()
        active, F.cuda_active = F.cuda_active, lambda: False
        plain = run_all()
        F.cuda_active = active
        names = ("add_rms_norm", "attention_heads+norm", "attention_heads", "swiglu", "norm_gemv add", "norm_gemv", "norm_gemv add swiglu", "gemv", "gemv K=2048",
                 "norm_gemv_heads add+qk norm", "norm_gemv_heads", "norm_gemv_heads 1x4 positions", "attention_cached (+storage)", "attention_cached 4 pos, view")
        for name, a, b in zip(names, cuda, plain):
            a, b = (a if isinstance(a, (tuple, list)) else [a]), (b if isinstance(b, (tuple, list)) else [b])
            err = max(float(mx.abs(u.astype(mx.float32) - v.astype(mx.float32)).max()) for u, v in zip(a, b))
            print(f"kernel {name:<22} {dtype}: max |cuda - mlx ops| {err:.3g}", flush=True)
        loaded = bench_model(MODEL, {mx.float32: "float32", mx.bfloat16: "bfloat16"}[dtype])
        model = loaded.model
        prompt = mx.array([prompt_tokens(loaded, 16)] * 2, dtype=mx.int32)
        fast = install(model)
        c_plain, c_fused = model.make_cache([0, 3]), model.make_cache([0, 3])
        ref = Model.__call__(model, prompt, c_plain)
        out = fast.forward(model, prompt, c_fused)
        err = float(mx.abs(ref - out).max())
        for t in (5, 9, 11, 13):
            tok = mx.array([[t], [t + 1]], dtype=mx.int32)
            err = max(err, float(mx.abs(Model.__call__(model, tok, c_plain) - fast.forward(model, tok, c_fused)).max()))
        print(f"fused forward vs plain forward {dtype}: max logit diff {err:.3g} (logits up to {float(mx.abs(ref).max()):.3g})", flush=True)
        # the same, decode steps only: both caches filled by the plain forward (prompt attention
        # picks its kernel by the inputs' layout, and the GPU's fp32 kernels differ by ~1e-3)
        c_plain, c_fused = model.make_cache([0, 3]), model.make_cache([0, 3])
        Model.__call__(model, prompt, c_plain), Model.__call__(model, prompt, c_fused)
        err = 0.0
        for t in (5, 9, 11, 13):
            tok = mx.array([[t], [t + 1]], dtype=mx.int32)
            err = max(err, float(mx.abs(Model.__call__(model, tok, c_plain) - fast.forward(model, tok, c_fused)).max()))
        print(f"fused decode steps vs plain, same prompt cache {dtype}: max logit diff {err:.3g}", flush=True)


def engine_loop():
    """The Engine's own decode loop (core.generation.decode, async one step ahead) on the model as
    loaded (ordinary graph), fused with the plain forward, and fused with the compiled step (the
    default on CUDA; its first token includes the trace), 256 tokens after a 64-token prompt,
    twice each: whether the ordinary graph's slow pipelined steps in profile() are the harness or
    the engine."""
    import itertools
    from stratlm.decoding.loop import decode
    from stratlm.decoding.sampler import Sampler
    from stratlm.core.types import SamplingParams

    loaded = bench_model(MODEL, "bfloat16")
    prompt = prompt_tokens(loaded, 64)
    fused = bench_model(MODEL, "bfloat16").model
    install(fused)
    def timed(model):  # (start, first token, end)
        t0 = time.perf_counter()
        tokens = decode(model, prompt, Sampler(SamplingParams()))
        next(tokens)  # the step (compiled or not) is chosen here, at the first token
        t1 = time.perf_counter()
        list(itertools.islice(tokens, 255))
        return t0, t1, time.perf_counter()

    for name, model, setting in (("ordinary", loaded.model, None), ("fused, plain", fused, "off"), ("fused, compiled", fused, None)) * 2:
        t0, t1, t2 = with_compile(setting, lambda: timed(model))()
        print(f"decode loop, {name:<15} {255 / (t2 - t1):.0f} tok/s (first token {1e3 * (t1 - t0):.0f} ms)", flush=True)
    os.environ.pop("STRATLM_COMPILE", None)


def main():
    print("mlx", mx.__version__, mx.default_device(), {k: v for k, v in os.environ.items() if k.startswith("MLX_")}, flush=True)
    if "--quick" not in sys.argv:
        check_fused()
    loaded = bench_model(MODEL, "bfloat16")
    folder = model_folder(loaded)
    prompt = mx.array([prompt_tokens(loaded, 64)], dtype=mx.int32)
    for name, make_cache, make_step in steps(folder):
        profile(name, make_step(make_cache()), prompt)
    if "--quick" not in sys.argv:
        kernel_overhead()
        attention_timing()
    if "--engine-loop" in sys.argv:
        engine_loop()


if __name__ == "__main__":
    main()
