"""The training loop shared by DoRA fine-tuning and healing.

AdamW with linear warm-up then cosine decay, gradient accumulation, a compiled train step,
a progress bar (stratlm.progress: steps, ETA, loss, tokens/s; a second one while validating) and
a progress line every `report_every` steps (loss, tokens/s, ETA, validation loss), checkpoints every N steps with the
optimizer and random state, and `resume=True` to continue from the last checkpoint at the
same step with the same state. Batches are a pure function of their index, so a resumed run
sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from stratlm.core.errors import ConfigError, StratlmError
from stratlm.core.log import get_logger
from stratlm import progress as bars

log = get_logger(__name__)

Arrays = tuple  # the arrays one micro-batch hands to the loss function
LossFn = Callable[..., tuple[mx.array, mx.array]]  # (model, *arrays) -> (mean loss, token count)

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
KEEP_CHECKPOINTS = 2
RUN_FILES = (WEIGHTS_FILE, "adapter_config.json")  # what a finished run leaves in `out` beside its checkpoints


class CheckpointError(StratlmError, OSError):
    """A checkpoint or adapter could not be written (full disk, read-only folder, a file in the way)."""


def write_error(path: Path, exc: OSError, lost: str = "the steps since the last checkpoint are lost") -> CheckpointError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return CheckpointError(f"cannot write {path}: {reason}; free some space or choose another folder" + (f" ({lost})" if lost else ""))


def previous_run(out: Path) -> list[str]:
    """The files and checkpoints of an earlier run in `out` (empty: the folder is free to use)."""
    if not out.is_dir():
        return []
    found = sorted(p.name for p in out.glob("checkpoint-*")) + sorted(p.name for p in out.glob(".partial-*"))
    return found + [name for name in RUN_FILES if (out / name).exists()]


def prepare_out(out: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Check (and create) a training output folder before any step is trained.

    A new run refuses a folder that holds another run (its checkpoints would be mixed with the
    new ones, and a later --resume would continue the wrong one) unless `overwrite`, which removes
    that run's files (only those: checkpoints, adapters.safetensors, adapter_config.json)."""
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    old = previous_run(out)
    if old and not resume:
        if not overwrite:
            shown = ", ".join(old[:4]) + (", ..." if len(old) > 4 else "")
            raise ConfigError(f"{out} already holds another training run ({shown}): pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out folder")
        for name in old:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        log.info("removed the previous run", out=str(out), files=old)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise write_error(Path(exc.filename) if exc.filename else out, exc, lost="") from exc
    return out


def _positive(name: str) -> Callable[[Any, Any, Any], None]:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")

    return check


@attrs.frozen
class TrainConfig:
    """How to train. Steps count optimizer updates; each takes `grad_accumulation` micro-batches."""

    steps: int = attrs.field(default=100, validator=_positive("steps"))
    batch_size: int = attrs.field(default=4, validator=_positive("batch_size"))
    grad_accumulation: int = attrs.field(default=1, validator=_positive("grad_accumulation"))
    learning_rate: float = attrs.field(default=1e-4, validator=_positive("learning_rate"))
    min_learning_rate: float = 0.0  # where the cosine ends
    warmup_steps: int = 10
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end (when there is validation data)
    report_every: int = 10
    max_length: int = 1024

    def __attrs_post_init__(self) -> None:
        for name in ("learning_rate", "min_learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.report_every < 1:
            raise ConfigError(f"report_every must be >= 1 (steps between progress lines), got {self.report_every}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 tokens (one to read, one to predict), got {self.max_length}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise ConfigError("checkpoint_every and eval_every must be >= 0 (0: only at the end)")

    def schedule(self) -> Callable[[mx.array], mx.array]:
        decay = optim.cosine_decay(self.learning_rate, self.steps - self.warmup_steps, end=self.min_learning_rate)
        if self.warmup_steps == 0:
            return decay
        warmup = optim.linear_schedule(self.learning_rate / self.warmup_steps, self.learning_rate, self.warmup_steps)
        return optim.join_schedules([warmup, decay], [self.warmup_steps])


@attrs.frozen
class Progress:
    step: int
    steps: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    elapsed: float
    eta: float
    val_loss: float | None = None

    def line(self) -> str:
        val = f"  val {self.val_loss:.4f}" if self.val_loss is not None else ""
        return (f"step {self.step:>5}/{self.steps}  loss {self.loss:.4f}{val}  lr {self.learning_rate:.2e}  "
                f"{self.tokens_per_second:,.0f} tok/s  elapsed {clock(self.elapsed)}  ETA {clock(self.eta)}")


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def print_progress(p: Progress) -> None:
    bars.write(p.line())  # above the progress bar when one is drawn


@attrs.frozen
class TrainResult:
    steps: int
    start_step: int  # > 0 when resumed
    loss: float  # mean training loss of the last report window
    val_loss: float | None
    losses: tuple[tuple[int, float], ...] = attrs.field(converter=tuple)  # (step, training loss)
    val_losses: tuple[tuple[int, float], ...] = attrs.field(converter=tuple)
    tokens: int = 0
    seconds: float = 0.0
    checkpoint: Path | None = None


def masked_cross_entropy(model: nn.Module, tokens: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
    """Mean next-token cross-entropy over the positions whose weight is 1. tokens, weights: (B, T)."""
    logits = model(tokens[:, :-1])
    w = weights[:, 1:]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:]) * w
    ntoks = w.sum()
    return ce.sum() / mx.maximum(ntoks, 1), ntoks


@attrs.frozen
class Batches:
    """Batches made one at a time as they are iterated, their number known up front (for the bar's total)."""

    count: int
    make: Callable[[], Iterator[Arrays]]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Arrays]:
        return iter(self.make())


def evaluate(model: nn.Module, loss_fn: LossFn, batches: Iterable[Arrays], *, progress_bar: bool | None = None) -> float:
    """Token-weighted mean loss over the batches (dropout off); a "validation" bar while it runs."""
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    size = len(batches) if hasattr(batches, "__len__") else None
    for arrays in bars.track(batches, size, "validation", unit="batch", progress_bar=progress_bar, leave=False):
        loss, ntoks = loss_fn(model, *arrays)
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    model.train()
    return float((total / mx.maximum(count, 1)).item())


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_trainable(model: nn.Module, folder: Path) -> None:
    mx.save_safetensors(str(folder / WEIGHTS_FILE), trainable_weights(model))


class Trainer:
    """Trains `model`'s trainable parameters (freeze the rest first) on `loss_fn`.

    `batch(index)` returns the arrays of micro-batch `index` (0, 1, 2, ...). `save(model, folder)`
    writes the trainable weights of a checkpoint (default: the trainable parameters, by name).
    `fingerprint` (JSON values) describes the data, model and settings; resuming from a checkpoint
    whose fingerprint differs is refused, naming what differs. `progress_bar`: True/False, or None
    for STRATLM_PROGRESS, else a bar only when stderr is a terminal (stratlm.progress); `label`
    names the bar.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Callable[[int], Arrays], config: TrainConfig, *,
                 out: str | Path | None = None, valid: Callable[[], Iterable[Arrays]] | None = None,
                 save: Callable[[nn.Module, Path], None] = save_trainable,
                 on_progress: Callable[[Progress], None] | None = print_progress,
                 on_step: Callable[[int], None] | None = None, fingerprint: dict[str, Any] | None = None,
                 progress_bar: bool | None = None, label: str = "train"):
        if not trainable_weights(model):
            raise ConfigError("the model has no trainable parameters; add adapters (or unfreeze some layers) first")
        self.model, self.loss_fn, self.batch, self.config = model, loss_fn, batch, config
        self.out = Path(out) if out is not None else None
        self.valid, self.save, self.on_progress, self.on_step = valid, save, on_progress, on_step
        self.progress_bar, self.label = progress_bar, label
        # what this run trains on (data, model, adapter, ...): stored with each checkpoint, checked on resume
        self.fingerprint = dict(fingerprint or {})
        self.run_id = uuid.uuid4().hex  # checkpoint rotation deletes only this run's checkpoints
        self.optimizer = optim.AdamW(learning_rate=config.schedule(), weight_decay=config.weight_decay)
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        self._compiled: Callable | None = None

    # -- the step --------------------------------------------------------------------------------
    def _compile(self) -> Callable:
        model, optimizer, cfg = self.model, self.optimizer, self.config
        loss_and_grad = nn.value_and_grad(model, self.loss_fn)
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(arrays: Arrays, previous: Any, update: bool) -> tuple[mx.array, mx.array, Any]:
            (loss, ntoks), grad = loss_and_grad(model, *arrays)
            if previous is not None:
                grad = tree_map(lambda a, b: a + b, grad, previous)
            if update:
                if cfg.grad_accumulation > 1:
                    grad = tree_map(lambda g: g / cfg.grad_accumulation, grad)
                if cfg.max_grad_norm > 0:
                    grad, _ = optim.clip_grad_norm(grad, cfg.max_grad_norm)
                optimizer.update(model, grad)
                grad = None
            return loss, ntoks, grad

        return step

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoints(self, run_id: str | None = None) -> list[Path]:
        """Complete checkpoints under `out`, oldest first (only run `run_id`'s when given)."""
        if self.out is None or not self.out.exists():
            return []
        found = [p for p in self.out.glob("checkpoint-*") if (p / STATE_FILE).exists()]
        if run_id is not None:
            found = [p for p in found if read_state(p).get("run_id") == run_id]
        return sorted(found, key=lambda p: (int(read_state(p).get("step", 0)), p.name))

    def save_checkpoint(self) -> Path:
        assert self.out is not None
        final = self.out / f"checkpoint-{self.step:06d}"
        partial_dir = self.out / f".partial-{self.step:06d}"
        try:
            shutil.rmtree(partial_dir, ignore_errors=True)
            partial_dir.mkdir(parents=True)
            self.save(self.model, partial_dir)
            optimizer_state = dict(tree_flatten(self.optimizer.state))
            mx.save_safetensors(str(partial_dir / OPTIMIZER_FILE), optimizer_state)
            state = {"step": self.step, "run_id": self.run_id, "fingerprint": self.fingerprint, "losses": self.losses,
                     "val_losses": self.val_losses, "config": attrs.asdict(self.config)}
            (partial_dir / STATE_FILE).write_text(json.dumps(state, indent=1))  # written last: marks it complete
            shutil.rmtree(final, ignore_errors=True)
            partial_dir.rename(final)
        except OSError as exc:
            shutil.rmtree(partial_dir, ignore_errors=True)  # a half-written checkpoint must not look complete
            raise write_error(Path(exc.filename) if exc.filename else partial_dir, exc) from exc
        except RuntimeError as exc:  # mx.save_safetensors reports a failed write as RuntimeError
            shutil.rmtree(partial_dir, ignore_errors=True)
            raise write_error(partial_dir, OSError(str(exc))) from exc
        for old in self.checkpoints(self.run_id)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        log.debug("checkpoint saved", path=str(final), step=self.step)
        return final

    def resume(self) -> int:
        """Load the latest checkpoint under `out`; returns its step (0 when there is none)."""
        found = self.checkpoints()
        if not found:
            log.warning("no checkpoint to resume from; starting at step 0", out=str(self.out))
            return 0
        # the latest written (checkpoints of one run only come from older versions mixed in one folder)
        folder = max(found, key=lambda p: (p / STATE_FILE).stat().st_mtime_ns)
        state = read_state(folder)
        check_fingerprint(folder, state.get("fingerprint"), self.fingerprint)
        saved = {k: v for k, v in state["config"].items() if k not in ("checkpoint_every", "eval_every", "report_every")}
        now = {k: v for k, v in attrs.asdict(self.config).items() if k in saved}
        changed = sorted(k for k in saved if saved[k] != now.get(k))
        if changed:
            raise ConfigError(f"cannot resume from {folder}: these settings differ from the checkpoint's: "
                              + ", ".join(f"{k} (was {saved[k]!r}, now {now[k]!r})" for k in changed))
        weights = mx.load(str(folder / WEIGHTS_FILE))
        expected = trainable_weights(self.model)
        if set(weights) != set(expected):
            raise ConfigError(f"cannot resume from {folder}: its trainable weights do not match this model's (different adapter settings?)")
        self.model.load_weights(list(weights.items()), strict=False)
        saved_state = mx.load(str(folder / OPTIMIZER_FILE))
        self.optimizer.init(self.model.trainable_parameters())
        if set(saved_state) != {k for k, _ in tree_flatten(self.optimizer.state)}:
            raise ConfigError(f"cannot resume from {folder}: its optimizer state does not match this model's trainable parameters")
        self.optimizer.state = tree_map_with_path(lambda path, _: saved_state[path], self.optimizer.state)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.step = int(state["step"])
        self.run_id = state.get("run_id") or self.run_id
        self.losses = [tuple(x) for x in state["losses"]]
        self.val_losses = [tuple(x) for x in state["val_losses"]]
        log.debug("resumed", checkpoint=str(folder), step=self.step)
        return self.step

    # -- the loop --------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        start = self.resume() if resume and self.out is not None else 0
        self._compiled = self._compile()  # after resume: the compiled step holds the optimizer's state
        self.model.train()
        tokens_total, window_loss, window_steps, window_tokens = 0, 0.0, 0, 0
        started = time.perf_counter()
        window_start = started
        window_eval = 0.0  # seconds spent validating in this window: not training, so not in its tokens/s
        last_checkpoint = None
        val_loss = None
        bar = bars.bar(cfg.steps, self.label, unit="step", initial=start, progress_bar=self.progress_bar)
        try:
            while self.step < cfg.steps:
                grad = None
                step_loss = mx.array(0.0)
                step_tokens = mx.array(0.0)
                mx.random.seed(cfg.seed * 1_000_003 + self.step)  # dropout masks: a function of the step, so resuming repeats them
                for micro in range(cfg.grad_accumulation):
                    arrays = self.batch(self.step * cfg.grad_accumulation + micro)
                    loss, ntoks, grad = self._compiled(tuple(arrays), grad, micro == cfg.grad_accumulation - 1)
                    step_loss, step_tokens = step_loss + loss, step_tokens + ntoks
                mx.eval(step_loss, step_tokens, self.model.trainable_parameters(), self.optimizer.state)
                self.step += 1
                loss_value = float(step_loss.item()) / cfg.grad_accumulation
                if not math.isfinite(loss_value):  # diverged: every later step would be NaN too
                    raise ConfigError(f"the training loss became {loss_value} at step {self.step}; lower the learning rate "
                                      f"(now {cfg.learning_rate:g}) or the adapter scale"
                                      + (f"; the last checkpoint is {self.checkpoints(self.run_id)[-1]}" if self.checkpoints(self.run_id) else ""))
                window_loss += loss_value
                window_steps += 1
                window_tokens += int(step_tokens.item())
                tokens_total += int(step_tokens.item())
                rate = window_tokens / max(time.perf_counter() - window_start - window_eval, 1e-9)
                bar.set_postfix_str(f"loss {loss_value:.4f}, {rate:,.0f} tok/s", refresh=False)
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(self.step)
                last = self.step == cfg.steps
                if self.valid is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    eval_start = time.perf_counter()
                    val_loss = evaluate(self.model, self.loss_fn, self.valid(), progress_bar=self.progress_bar)
                    window_eval += time.perf_counter() - eval_start
                    self.val_losses.append((self.step, val_loss))
                    bar.set_postfix_str(f"loss {loss_value:.4f}, val {val_loss:.4f}, {rate:,.0f} tok/s")
                if self.step % cfg.report_every == 0 or last:
                    now = time.perf_counter()
                    mean = window_loss / window_steps
                    self.losses.append((self.step, mean))
                    done = self.step - start
                    progress = Progress(step=self.step, steps=cfg.steps, loss=mean, learning_rate=float(self.optimizer.learning_rate.item()),
                                        tokens_per_second=window_tokens / max(now - window_start - window_eval, 1e-9), elapsed=now - started,
                                        eta=(now - started) / done * (cfg.steps - self.step), val_loss=val_loss)
                    if self.on_progress is not None:
                        self.on_progress(progress)
                    window_loss, window_steps, window_tokens, window_start, window_eval = 0.0, 0, 0, now, 0.0
                if self.out is not None and ((cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last):
                    last_checkpoint = self.save_checkpoint()
        except KeyboardInterrupt:
            # Ctrl-C: keep every finished step; `resume=True` continues from here
            if self.out is not None and self.step > start:
                self.save_checkpoint()
            raise
        finally:
            bar.close()
        self.model.eval()
        mean_loss = self.losses[-1][1] if self.losses else float("nan")
        return TrainResult(steps=self.step, start_step=start, loss=mean_loss, val_loss=val_loss, losses=self.losses,
                           val_losses=self.val_losses, tokens=tokens_total, seconds=time.perf_counter() - started, checkpoint=last_checkpoint)


def read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {folder / STATE_FILE}: {exc}; remove that checkpoint folder or pass --overwrite") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"{folder / STATE_FILE} is not a trainer state (a JSON object); remove that checkpoint folder or pass --overwrite")
    return state


def check_fingerprint(folder: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint made with other data, another model or other settings."""
    if not now:
        return
    if saved is None:
        raise ConfigError(f"cannot resume from {folder}: it was written without a record of its data, model and settings "
                          "(an older stratlm), so it may belong to another run; pass --overwrite to start over")
    changed = []
    for key in sorted(set(saved) | set(now)):
        was, new = saved.get(key), now.get(key)
        if was == new:
            continue
        if isinstance(was, dict) and isinstance(new, dict):
            changed += [f"{key}.{k} (was {was.get(k)!r}, now {new.get(k)!r})" for k in sorted(set(was) | set(new)) if was.get(k) != new.get(k)]
        else:
            changed.append(f"{key} (was {was!r}, now {new!r})")
    if changed:
        raise ConfigError(f"cannot resume from {folder}: the run differs from the checkpoint's: {'; '.join(changed)}. "
                          "Resume with the same data, model and settings, or pass --overwrite to start a new run there")


def batches_of(items: Sequence[Any], batch_size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]
