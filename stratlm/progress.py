"""Progress bars for the long steps (heal, training, validation, conversion): one tqdm helper.

Whether a bar shows, first match wins:
  1. the call's own `progress_bar=True/False` (heal_model, finetune, Trainer, convert, ...);
  2. STRATLM_PROGRESS=on/off in the environment;
  3. otherwise tqdm's own convention (`disable=None`): shown when stderr is a terminal, never
     written into a pipe, a log file or a notebook's captured stream.

Bars go to stderr (the stream at the time of the call, so pytest's capture and notebooks see
them); results go to stdout as before. Hugging Face downloads keep huggingface_hub's own bars
(HF_HUB_DISABLE_PROGRESS_BARS turns those off).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence, TextIO, TypeVar

from tqdm import tqdm

from stratlm.env import flag

T = TypeVar("T")

ENV = "STRATLM_PROGRESS"
# tqdm's layout with the remaining time labelled, so a first-time user reads it as an ETA
FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}]"
FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed} elapsed, {rate_fmt}{postfix}]"


def enabled(progress_bar: bool | None = None, stream: TextIO | None = None) -> bool:
    """Whether to draw bars (see the module doc for the order of the settings)."""
    if progress_bar is not None:
        return bool(progress_bar)
    setting = flag(ENV)
    if setting is not None:
        return setting
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def bar(total: int | None = None, desc: str = "", *, unit: str = "it", progress_bar: bool | None = None, leave: bool = True,
        initial: int = 0, **options: Any) -> tqdm:
    """A tqdm bar on stderr; a silent one (same methods, writes nothing) when bars are off."""
    stream = sys.stderr
    on = enabled(progress_bar, stream)
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not on, leave=leave, initial=initial, dynamic_ncols=True,
                bar_format=FORMAT if total is not None else FORMAT_NO_TOTAL, **options)


def track(items: Iterable[T], total: int | None = None, desc: str = "", *, unit: str = "it", progress_bar: bool | None = None,
          leave: bool = True) -> Iterable[T]:
    """`items`, with a bar advancing as each one is taken."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, desc, unit=unit, progress_bar=progress_bar, leave=leave) as b:
        for item in items:
            yield item
            b.update(1)


def write(message: str) -> None:
    """A line on stderr that does not tear a bar being drawn (it is printed above it)."""
    tqdm.write(message, file=sys.stderr)


def collect(handles: Sequence[Any], desc: str, *, unit: str = "text", progress_bar: bool | None = None) -> list[Any]:
    """The results of requests submitted together (Engine.submit: one batch), in order, with a bar
    that advances as each finishes; on an error or Ctrl-C the ones still running are cancelled."""
    results = []
    try:
        # smoothing 0: the rate is the mean since the start, as answers finish in bursts (a batch at a time)
        with bar(len(handles), desc, unit=unit, progress_bar=progress_bar, smoothing=0) as b:
            for h in handles:
                while True:
                    try:
                        results.append(h.result(timeout=1.0))
                        break
                    except TimeoutError:
                        b.refresh()  # the elapsed time keeps moving while the first answers are written
                b.update(1)
        return results
    finally:
        for h in handles:
            h.cancel()  # a no-op for finished requests
