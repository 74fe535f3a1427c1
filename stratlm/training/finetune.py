"""DoRA fine-tuning: a model, JSONL data -> an adapter folder mlx-lm and stratlm both load.

    from stratlm.training.finetune import finetune
    result = finetune(loaded, "train.jsonl", out="adapters", train=TrainConfig(steps=200))
    Engine(model=..., adapter="adapters")

`out` holds adapters.safetensors + adapter_config.json (the final adapter) and the last
checkpoints (checkpoint-NNNNNN/, each itself a loadable adapter folder plus optimizer state).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import attrs
import mlx.core as mx
import mlx.nn as nn

from stratlm.core.errors import ConfigError
from stratlm.core.model import LoadedModel

from .data import Dataset, batch_arrays, load_jsonl, micro_batch
from stratlm.transforms.dora import AdapterConfig, add_adapters, copy_loaded, save_adapter
from mlx.utils import tree_flatten

from .trainer import Batches, Progress, TrainConfig, Trainer, TrainResult, batches_of, masked_cross_entropy, prepare_out, print_progress, write_error


@attrs.frozen
class FinetuneResult:
    loaded: LoadedModel  # the model with its (unfused) adapters
    training: TrainResult
    adapter_path: Path | None
    train_examples: int
    valid_examples: int


def as_dataset(data: Dataset | str | Path, loaded: LoadedModel, train_on_prompt: bool, on_error: str, max_length: int) -> Dataset:
    if isinstance(data, Dataset):
        return data
    return load_jsonl(data, loaded.tokenizer, train_on_prompt=train_on_prompt, on_error=on_error, max_length=max_length)


def dataset_digest(dataset: Dataset | None) -> str | None:
    """Which examples, in which order, with which loss masks: a resumed run must see the same."""
    if dataset is None:
        return None
    h = hashlib.sha256()
    for e in dataset.examples:
        h.update(repr((e.tokens, e.loss_mask)).encode())
    return f"{len(dataset)} examples, sha256 {h.hexdigest()[:16]}"


def model_digest(model: nn.Module) -> str:
    """The base weights by name, shape, dtype and sum (cheap: one evaluation), not by the path they came from."""
    flat = tree_flatten(model.parameters())
    sums = [mx.sum(v.astype(mx.float32)) for _, v in flat]
    mx.eval(sums)
    h = hashlib.sha256()
    for (name, v), total in zip(flat, sums):
        h.update(f"{name} {tuple(v.shape)} {v.dtype} {float(total.item()):.6g}\n".encode())
    count = sum(v.size for _, v in flat)
    return f"{len(flat)} tensors, {count:,} stored values, sha256 {h.hexdigest()[:16]}"


def run_fingerprint(loaded: LoadedModel, train_set: Dataset, valid_set: Dataset | None, adapter: AdapterConfig) -> dict[str, Any]:
    adapter_settings = json.loads(json.dumps(attrs.asdict(adapter)))  # as it reads back from the checkpoint (tuples become lists)
    return {"model": model_digest(loaded.model), "training data": dataset_digest(train_set),
            "validation data": dataset_digest(valid_set), "adapter": adapter_settings}


def finetune(
    loaded: LoadedModel,
    data: Dataset | str | Path,
    *,
    valid: Dataset | str | Path | None = None,
    valid_fraction: float = 0.1,
    adapter: AdapterConfig = AdapterConfig(),
    train: TrainConfig = TrainConfig(),
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    train_on_prompt: bool = False,
    on_error: str = "skip",
    on_progress: Callable[[Progress], None] | None = print_progress,
    on_step: Callable[[int], None] | None = None,
    progress_bar: bool | None = None,
) -> FinetuneResult:
    """Fine-tune DoRA (or LoRA) adapters on `data` (a JSONL path or a Dataset); `loaded` is left as it was.

    Validation: `valid` if given, else a seeded `valid_fraction` of `data` (0: none).
    An `out` that holds another run is refused unless `resume` (continue it: data, model and
    settings must match its checkpoint's) or `overwrite` (replace it).
    `on_progress` gets a line's worth every `train.report_every` steps (None: nothing);
    `progress_bar` draws bars for the steps and the validation (None: STRATLM_PROGRESS, else only
    when stderr is a terminal; see stratlm.progress).
    """
    if resume and out is None:
        raise ConfigError("resume needs the output folder of the interrupted run (out=...)")
    if out is not None:
        out = prepare_out(out, resume=resume, overwrite=overwrite)
    train_set = as_dataset(data, loaded, train_on_prompt, on_error, train.max_length)
    valid_set: Dataset | None = None
    if valid is not None:
        valid_set = as_dataset(valid, loaded, train_on_prompt, on_error, train.max_length)
    elif valid_fraction:
        train_set, valid_set = train_set.split(valid_fraction, seed=train.seed)
    fingerprint = run_fingerprint(loaded, train_set, valid_set, adapter)
    result = copy_loaded(loaded)
    model = result.model
    mx.random.seed(train.seed)  # the adapters' initial A matrices
    add_adapters(model, adapter)
    extra = {"base_model": loaded.source}

    def batch(index: int) -> tuple[mx.array, mx.array]:
        tokens, weights = batch_arrays(micro_batch(train_set, train.batch_size, train.seed, index))
        return mx.array(tokens), mx.array(weights)

    def valid_batches():
        for chunk in batches_of(valid_set.examples, train.batch_size):
            tokens, weights = batch_arrays(chunk)
            yield mx.array(tokens), mx.array(weights)

    def valid():  # made as they are used, counted for the validation bar
        return Batches(-(-len(valid_set) // train.batch_size), valid_batches)

    def save(m: nn.Module, folder: Path) -> None:
        save_adapter(m, folder, adapter, **extra)

    trainer = Trainer(model, masked_cross_entropy, batch, train, out=out, valid=valid if valid_set else None,
                      save=save, on_progress=on_progress, on_step=on_step, fingerprint=fingerprint, progress_bar=progress_bar)
    outcome = trainer.run(resume=resume)
    adapter_path = None
    if out is not None:
        try:
            adapter_path = save_adapter(model, out, adapter, **extra)
        except OSError as exc:
            raise write_error(Path(exc.filename) if exc.filename else Path(out), exc, lost=f"the last checkpoint in {out} holds the trained adapter") from exc
        except RuntimeError as exc:  # mx.save_safetensors
            raise write_error(Path(out), OSError(str(exc)), lost=f"the last checkpoint in {out} holds the trained adapter") from exc
    return FinetuneResult(loaded=result.replace(source=f"{loaded.source}+dora"), training=outcome, adapter_path=adapter_path,
                          train_examples=len(train_set), valid_examples=len(valid_set) if valid_set else 0)
