"""How long heal takes on the embedded SmolLM2, from a short run scaled to the defaults
(64 texts of <= 96 tokens, 60 steps): PYTHONPATH=. python3 scripts/heal_timing.py [TEXTS] [STEPS]."""

import sys
import time

import stratlm  # noqa: F401  (the optimized BLAS first)
from stratlm.loaders.loading import load_model
from stratlm.transforms.collapse import collapse
from stratlm.transforms.heal import heal_model, teacher_texts
from stratlm.transforms.texts import varied_prompts

texts = int(sys.argv[1]) if len(sys.argv) > 1 else 16
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
start = time.perf_counter()
teacher = load_model(None)
print(f"load {time.perf_counter() - start:.1f} s", flush=True)
start = time.perf_counter()
student = collapse(teacher)
print(f"collapse {time.perf_counter() - start:.1f} s, {len(student.model.layers)} blocks", flush=True)
start = time.perf_counter()
data = teacher_texts(teacher, varied_prompts(texts, 0), 96, 0, progress_bar=True)
texts_s = time.perf_counter() - start
print(f"teacher texts: {texts} in {texts_s:.1f} s, {sum(len(e) for e in data.examples)} tokens", flush=True)
start = time.perf_counter()
heal_model(student, data=data, steps=steps, on_progress=None, progress_bar=True)  # the bar shows each step's time
steps_s = time.perf_counter() - start
print(f"heal: {steps} steps in {steps_s:.1f} s ({steps_s / steps:.1f} s a step, setup and fusing included)", flush=True)
print(f"scaled to the defaults (64 texts, 60 steps): texts {texts_s * 64 / texts / 60:.1f} min + steps {steps_s * 60 / steps / 60:.1f} min")
