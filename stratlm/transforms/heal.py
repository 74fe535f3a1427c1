"""heal: distil a collapsed student towards its original teacher.

loss = KL(teacher || student) over next-token distributions (+ `hidden_weight` x MSE between the
student's hidden state leaving the last trainable block and the teacher's at the mapped block).
Trainable: DoRA adapters on the `around` blocks either side of the cut, and those blocks' norms;
afterwards the adapters are fused, so the result is an ordinary model.

Data: by default the teacher writes it (self-distillation) from a seeded set of varied prompts;
a JSONL dataset (any format of `data.load_jsonl`) can be given instead. `heal_report` measures
KL to the teacher, top-1 agreement and perplexity on held-out text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn

from stratlm.engine import Engine
from stratlm.core.errors import ConfigError
from stratlm.core.model import LoadedModel
from stratlm.loaders.loading import load_model
from stratlm.core.log import get_logger
from stratlm import progress as bars
from stratlm.decoding.sampler import log_softmax

from .collapse import Origin, origin_of
from stratlm.training.data import Dataset, Example, batch_arrays, load_jsonl, micro_batch
from .dora import AdapterConfig, add_adapters, copy_loaded, fuse_model
from .texts import heldout_prompts, varied_prompts
from stratlm.training.trainer import Progress, TrainConfig, Trainer, batches_of, print_progress

log = get_logger(__name__)


# -- data ------------------------------------------------------------------------------------------
def teacher_texts(teacher: LoadedModel, prompts: Sequence[str], max_tokens: int = 96, seed: int = 0, temperature: float = 0.8,
                  progress_bar: bool | None = None) -> Dataset:
    """The teacher's own answers to `prompts` (sampled, seeded, batched): prompt + answer tokens, all in the loss."""
    if not prompts:
        return Dataset([])
    with Engine(teacher, strategy="batch", batch_size=16) as engine:
        # submitted together (one batch, as engine.generate does), collected under a bar
        handles = [engine.submit(p, max_tokens=max_tokens, temperature=temperature, top_p=0.95, seed=seed) for p in prompts]
        results = bars.collect(handles, "teacher texts", progress_bar=progress_bar)
        examples = []
        for prompt, result in zip(prompts, results):
            ids = engine.render(prompt)[1] + list(result.token_ids)
            examples.append(Example(ids, [True] * len(ids)))
    return Dataset(examples)


def self_distillation_data(teacher: LoadedModel, n_train: int, n_heldout: int, max_tokens: int, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) teacher texts from disjoint built-in prompts; heal(prompts=n_train, seed=seed) trains on the same."""
    train = teacher_texts(teacher, varied_prompts(n_train, seed), max_tokens, seed)
    return train, teacher_texts(teacher, heldout_prompts(n_heldout, seed), max_tokens, seed + 1)


# -- the loss --------------------------------------------------------------------------------------

def kl_per_token(teacher_lp: mx.array, student_lp: mx.array) -> mx.array:
    """KL(teacher || student) at each position. (..., V) log-probabilities -> (...)."""
    return (mx.exp(teacher_lp) * (teacher_lp - student_lp)).sum(-1)


def make_distill_loss(probe_block: int | None, hidden_weight: float) -> Callable:
    def loss_fn(student: nn.Module, tokens: mx.array, weights: mx.array, teacher_lp: mx.array, teacher_hidden: mx.array) -> tuple[mx.array, mx.array]:
        if hidden_weight > 0 and probe_block is not None:
            states = student.hidden_states(tokens)
            logits = student.head(states[-1])
        else:
            logits = student(tokens)
        ntoks = weights.sum()
        kl = (kl_per_token(teacher_lp, log_softmax(logits.astype(mx.float32))) * weights).sum() / mx.maximum(ntoks, 1)
        if hidden_weight > 0 and probe_block is not None:
            diff = (states[probe_block + 1].astype(mx.float32) - teacher_hidden) ** 2
            kl = kl + hidden_weight * (diff.mean(-1) * weights).sum() / mx.maximum(ntoks, 1)
        return kl, ntoks

    return loss_fn


# -- the transform ---------------------------------------------------------------------------------
def trainable_window(student: nn.Module, origin: Origin, around: int) -> list[int]:
    """Student blocks within `around` of the cut; a tied block (one module listed several times) once."""
    depth = len(student.layers)
    middle = origin.n if origin.mode == "tie" else (1 if origin.mode == "merge" and origin.n else 0)
    lo, hi = max(0, origin.start - around), min(depth, origin.start + middle + around)
    seen: set[int] = set()
    window = []
    for i in range(lo, hi):
        if id(student.layers[i]) not in seen:
            seen.add(id(student.layers[i]))
            window.append(i)
    return window


def resolve_teacher(loaded: LoadedModel, teacher: LoadedModel | str | None) -> tuple[LoadedModel, Origin | None]:
    origin = origin_of(loaded.model)
    if isinstance(teacher, LoadedModel):
        return teacher, origin
    if isinstance(teacher, str):
        return load_model(teacher), origin
    if origin is None:
        raise ConfigError("heal needs a teacher: run collapse before it in the same chain (transforms=['collapse', 'heal']) or pass teacher=<model>")
    return origin.teacher, origin


@attrs.frozen
class HealResult:
    loaded: LoadedModel
    window: tuple[int, ...] = attrs.field(converter=tuple)
    final_loss: float = float("nan")
    seconds: float = 0.0


def heal_model(
    loaded: LoadedModel,
    *,
    teacher: LoadedModel | str | None = None,
    data: str | Path | Dataset | None = None,
    around: int = 2,
    rank: int = 8,
    scale: float = 20.0,
    hidden_weight: float = 0.0,
    prompts: int = 64,
    max_tokens: int = 96,
    steps: int = 60,
    batch_size: int = 4,
    learning_rate: float = 1e-4,
    seed: int = 0,
    on_progress: Callable[[Progress], None] | None = print_progress,
    progress_bar: bool | None = None,
) -> HealResult:
    """Heal a collapsed model (see the module doc); returns a new, fused model.

    `on_progress` gets a line's worth ten times in the run (None: nothing). `progress_bar` draws
    bars with an ETA for the teacher's texts and the steps (None: STRATLM_PROGRESS, else only when
    stderr is a terminal; see stratlm.progress)."""
    if around < 1:
        raise ConfigError(f"around must be >= 1 (blocks either side of the cut to train), got {around}")
    teacher_model, origin = resolve_teacher(loaded, teacher)
    if origin is None:
        origin = Origin(teacher=teacher_model, start=len(loaded.model.layers) // 2, n=0, mode="drop", distance=None,
                        block_map=list(range(len(loaded.model.layers))))
        log.warning("the student was not made by collapse; training the middle blocks", start=origin.start)
    if isinstance(data, Dataset):
        train_set = data
    elif data is not None:
        train_set = load_jsonl(data, loaded.tokenizer, train_on_prompt=True, max_length=512)
    else:
        if prompts < 1:
            raise ConfigError(f"prompts (how many texts the teacher writes to heal on) must be >= 1, got {prompts}")
        train_set = teacher_texts(teacher_model, varied_prompts(prompts, seed), max_tokens, seed, progress_bar=progress_bar)
    result = copy_loaded(loaded)
    student = result.model
    window = trainable_window(student, origin, around)
    mx.random.seed(seed)
    add_adapters(student, AdapterConfig(rank=rank, scale=scale, layers=window))
    for i in window:  # the norms of the trained blocks learn too
        for _, module in student.layers[i].named_modules():
            if isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                module.unfreeze()
    probe = window[-1]
    teacher_probe = origin.block_map[probe]
    loss_fn = make_distill_loss(probe, hidden_weight)

    def batch(index: int) -> tuple[mx.array, ...]:
        tokens, weights = batch_arrays(micro_batch(train_set, batch_size, seed, index))
        tokens = mx.array(tokens)
        weights = mx.array(weights)[:, :-1]
        inputs, teacher_hidden = tokens[:, :-1], mx.zeros((1,))
        if hidden_weight > 0:
            states = teacher_model.model.hidden_states(inputs)
            teacher_lp = log_softmax(teacher_model.model.head(states[-1]).astype(mx.float32))
            teacher_hidden = states[teacher_probe + 1].astype(mx.float32)
        else:
            teacher_lp = log_softmax(teacher_model.model(inputs).astype(mx.float32))
        return inputs, weights, mx.stop_gradient(teacher_lp), mx.stop_gradient(teacher_hidden)

    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=max(1, steps // 10),
                         report_every=max(1, steps // 10), seed=seed)
    outcome = Trainer(student, loss_fn, batch, config, on_progress=on_progress, progress_bar=progress_bar, label="heal").run()
    fuse_model(student)
    return HealResult(result.replace(source=f"{loaded.source}+heal"), window, outcome.loss, outcome.seconds)


def heal(loaded: LoadedModel, **options: Any) -> LoadedModel:
    """Transform: the healed model (options as heal_model's)."""
    options.setdefault("on_progress", None)
    return heal_model(loaded, **options).loaded


# -- measuring -------------------------------------------------------------------------------------
@attrs.frozen
class Agreement:
    kl: float  # mean KL(teacher || model) per token, nats
    top1: float  # fraction of positions where the model's argmax is the teacher's
    perplexity: float  # of the text itself


def compare_to_teacher(model: LoadedModel, teacher: LoadedModel, text: Dataset, batch_size: int = 8) -> Agreement:
    kl_sum = agree = nll = count = 0.0
    for chunk in batches_of(text.examples, batch_size):
        tokens, weights = batch_arrays(chunk)
        tokens, w = mx.array(tokens), mx.array(weights)[:, 1:]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        t_lp = log_softmax(teacher.model(inputs).astype(mx.float32))
        s_lp = log_softmax(model.model(inputs).astype(mx.float32))
        kl_sum += float((kl_per_token(t_lp, s_lp) * w).sum().item())
        agree += float(((t_lp.argmax(-1) == s_lp.argmax(-1)) * w).sum().item())
        nll += float((-mx.take_along_axis(s_lp, targets[..., None], axis=-1)[..., 0] * w).sum().item())
        count += float(w.sum().item())
    return Agreement(kl=kl_sum / count, top1=agree / count, perplexity=math.exp(nll / count))


def heal_report(teacher: LoadedModel, models: dict[str, LoadedModel], heldout: Dataset) -> dict[str, Agreement]:
    return {name: compare_to_teacher(m, teacher, heldout) for name, m in models.items()}


def format_heal_report(report: dict[str, Agreement]) -> str:
    lines = [f"{'model':<12} {'KL(teacher||model)':>19} {'top-1 agreement':>16} {'perplexity':>11}"]
    for name, a in report.items():
        lines.append(f"{name:<12} {a.kl:>19.4f} {a.top1:>16.1%} {a.perplexity:>11.2f}")
    return "\n".join(lines)
