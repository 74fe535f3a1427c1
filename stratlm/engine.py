"""Engine: a model, a strategy and transforms, composed by name from the registry."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence, Union

from stratlm.backends.cpu import decoder as cpu_decoder
from stratlm.backends.cuda import decoder as cuda_decoder
from stratlm.core.errors import ConfigError, ModelLoadError, StratlmError
from stratlm.device import cpu_active, cuda_active
from stratlm.core.model import LoadedModel
from stratlm.core.strategy import Strategy, Transform
from stratlm.loaders.loading import load_model
from stratlm.core.log import get_logger
from stratlm.core.registry import Registry, get_registry
from stratlm.core.types import GenerationParams, GenerationResult, SamplingParams
from stratlm.decoding.scheduler import RequestHandle, Scheduler, SchedulerConfig

log = get_logger(__name__)

Message = dict
Prompt = Union[str, Sequence[Message]]
TransformSpec = Union[str, tuple]  # "collapse" or ("collapse", {"n": 4})


class Engine:
    """Load a model (alias, hub id, folder, .gguf; None = the embedded SmolLM2), apply an adapter
    and transforms, and decode with a strategy. Extra keyword options go to the strategy.

    Every generation runs in the engine's scheduler (continuous batching, prefix caching): call
    it from any number of threads or asyncio tasks. `scheduler`: a SchedulerConfig or a dict
    of its options (max_running, max_queue, kv_budget, prefix_cache_bytes, prefill_chunk, prefill_batch, batch_prefills).

    An adapter is merged into the base weights at load (`fuse_adapter=False` keeps it as
    separate layers, as training needs; that form decodes many times slower).

    parallel="tensor" | "pipeline": split the model over the processes `mlx.launch` started
    (docs/distributed.md). Every process runs the same program; on rank 0 this Engine works as
    usual, on the others the constructor serves rank 0's forwards and ends the process when rank 0
    is done (it never returns there). A split model runs one request at a time: submitted ones
    wait in the scheduler's queue, and generate/stream take their turn with them."""

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        strategy: str = "greedy",
        *,
        transforms: Sequence[TransformSpec] = (),
        adapter: str | Path | None = None,
        fuse_adapter: bool = True,
        dtype: str | None = None,
        quantized: str | None = None,
        registry: Registry | None = None,
        scheduler: SchedulerConfig | dict | None = None,
        parallel: str | None = None,
        **options: Any,
    ):
        self.registry = registry or get_registry()
        if model is not None and not isinstance(model, (str, os.PathLike, LoadedModel)):
            raise ConfigError(f"model must be an alias, hub repo id, folder or .gguf path (a string), a LoadedModel or None, "
                              f"got {type(model).__name__}: {model!r:.60}")
        if not isinstance(strategy, str):
            raise ConfigError(f"strategy must be a strategy's name (a string, e.g. 'greedy'), got {type(strategy).__name__}: {strategy!r:.60}")
        if adapter is not None and not isinstance(adapter, (str, os.PathLike)):
            raise ConfigError(f"adapter must be an adapter folder's path, got {type(adapter).__name__}: {adapter!r:.60}")
        if isinstance(transforms, str) or not isinstance(transforms, (list, tuple)):
            raise ConfigError(f"transforms is a list, e.g. ['heal'] or [('collapse', {{'n': 4}})], got {type(transforms).__name__}: {transforms!r:.60}")
        self.scheduler_config = SchedulerConfig.make(scheduler)
        # names first: a typo should not cost a model load
        strategy_class = self.registry.get("strategy", strategy)
        for spec in transforms:
            name, transform_options = parse_transform(spec)  # not `options`: those are the strategy's
            check_transform_options(name, self.registry.get("transform", name), transform_options)
        if parallel is not None:
            self.loaded = load_split(model, parallel, dtype=dtype, quantized=quantized, registry=self.registry,
                                     adapter=adapter, transforms=transforms)
        else:
            self.loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, quantized=quantized, registry=self.registry)
        if adapter is not None and parallel is None:
            self.loaded = apply_adapter(self.loaded, Path(adapter), self.registry)
            if fuse_adapter:  # merged into the base weights: decodes at the base's speed (unfused: ~20x slower on the CPU kernels)
                self.loaded = self.registry.get("transform", "fuse")(self.loaded)
        self.loaded = apply_transforms(self.loaded, transforms, self.registry)
        # a split model (given here already loaded, e.g. from stratlm.distributed.load_parallel) too
        self.split = getattr(self.loaded.model, "split_over_processes", None)
        if cuda_active() and self.split is None:  # the fused decode path (fewer graph nodes a token)
            cuda_decoder.install(self.loaded.model)
        elif cpu_active() and self.split is None:  # a model on the CPU kernels: one graph node a block when decoding
            cpu_decoder.install(self.loaded.model)
        self.strategy = strategy_class(self.loaded, registry=self.registry, **options)
        self.strategy_name = strategy
        self._strategies: dict[tuple, Strategy] = {}
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()
        self._drive_lock = threading.Lock()  # a split model: the one generation issuing forwards (see _driving)
        self._owns_split = parallel is not None  # close() ends the other processes of a group this Engine formed
        self.parallel = parallel if parallel is not None else self.split
        self.last_result: GenerationResult | None = None
        log.debug("engine ready", model=self.loaded.source, strategy=strategy, transforms=list(transforms))

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def model(self):
        return self.loaded.model

    # -- prompts ---------------------------------------------------------------------------------
    def render(self, prompt: Prompt, *, chat_template: bool | None = None, chat_template_kwargs: dict | None = None, system: str | None = None,
               tools: Sequence[dict] | None = None) -> tuple[str, list[int]]:
        """The prompt text the model sees and its token ids.

        chat_template None: apply the model's template when it has one (instruct models).
        """
        tok = self.tokenizer
        if chat_template is not None and not isinstance(chat_template, bool):
            raise ConfigError(f"chat_template must be True, False or None (the model's choice), got {chat_template!r}")
        if chat_template_kwargs is not None and not (isinstance(chat_template_kwargs, dict) and all(isinstance(k, str) for k in chat_template_kwargs)):
            raise ConfigError(f"chat_template_kwargs must be a dict with string keys, e.g. {{'enable_thinking': False}}, got {chat_template_kwargs!r:.60}")
        if system is not None:
            check_text(system, "the system message")
        if isinstance(prompt, str):
            if not prompt:
                raise ConfigError("the prompt is empty; give some text")
            check_text(prompt, "the prompt")
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and prompt and all(isinstance(m, dict) for m in prompt):
            messages = list(prompt)
            if any("role" not in m or "content" not in m for m in messages):
                raise ConfigError("chat messages need 'role' and 'content' keys, e.g. {'role': 'user', 'content': 'Hi'}")
            for i, m in enumerate(messages):
                check_text(m["role"], f"message {i}'s role")
                check_text(m["content"], f"message {i}'s content")
            if chat_template is False:
                raise ConfigError("chat messages need the chat template; pass a plain string prompt to skip it")
        else:
            kind = type(prompt).__name__
            raise ConfigError(f"a prompt is a string or a list of chat messages ({{'role': ..., 'content': ...}}), got {kind}"
                              + (" (decode bytes first: data.decode('utf-8'))" if isinstance(prompt, bytes) else ""))
        if system is not None:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
        use_template = tok.has_chat_template if chat_template is None else chat_template
        if use_template:
            extra = dict(chat_template_kwargs or {})
            if tools:
                extra["tools"] = list(tools)
            text = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages)
            ids = tok.encode(text)
        limit = self.loaded.context_length
        if limit is not None and len(ids) >= limit:
            raise ConfigError(f"the prompt is {len(ids)} tokens; this model's context is {limit} tokens: shorten the prompt")
        return text, ids

    def params(self, **kwargs: Any) -> GenerationParams:
        return make_params(self.strategy.default_temperature, **check_keywords(kwargs))

    # -- generation ------------------------------------------------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        """The loop that runs every request (started at first use). A split model's caches are not
        the scheduler's batchable kind: it runs each request's own strategy stream, one at a time."""
        with self._scheduler_lock:
            if self._scheduler is None:
                with self._driving() if self.split is not None else contextlib.nullcontext():  # its probe forward: alone
                    self._scheduler = Scheduler(self.loaded, self.scheduler_config)
                watch = getattr(self.model, "watchdog", None) if self.split is not None else None
                if watch is not None:  # stuck on a lost process: its requests are answered with the error
                    watch.on_stuck.append(self._scheduler.abandon)
            return self._scheduler

    def strategy_for(self, name: str | None = None, options: dict | None = None) -> Strategy:
        """The engine's strategy (no name), or one made by name with options, kept for reuse."""
        if name is None and not options:
            return self.strategy
        name = name or self.strategy_name
        options = dict(options or {})
        try:
            key = (name, tuple(sorted((k, repr(v)) for k, v in options.items())))
        except TypeError:
            key = None
        with self._scheduler_lock:
            made = self._strategies.get(key) if key is not None else None
        if made is None:
            made = self.registry.get("strategy", name)(self.loaded, registry=self.registry, **options)
            if key is not None:
                with self._scheduler_lock:
                    self._strategies.setdefault(key, made)
        return made

    def submit(self, prompt: Prompt, *, strategy: str | None = None, strategy_options: dict | None = None, chat_template: bool | None = None,
               chat_template_kwargs: dict | None = None, system: str | None = None, tools: Sequence[dict] | None = None, **kwargs: Any) -> RequestHandle:
        """Queue one prompt; the handle streams its text pieces and ends with its result.
        Everything is checked now: a bad parameter, prompt or strategy raises here, and so does
        a full queue (QueueFullError)."""
        chosen = self.strategy_for(strategy, strategy_options)
        params = make_params(chosen.default_temperature, **check_keywords(kwargs))
        text, ids = self.render(prompt, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs, system=system, tools=tools)
        if self.split is not None:
            self._check_group()
            chosen = SplitDriven(chosen, self._driving)
        handle = self.scheduler.submit(ids, params, chosen)
        handle.prompt = text
        return handle

    def generate(self, prompt: Prompt | Sequence[Prompt], *, chat_template: bool | None = None, chat_template_kwargs: dict | None = None,
                 system: str | None = None, **kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """One prompt (a string or chat messages) -> a result; a list of prompts -> a list of
        results (decoded together in the scheduler's batch)."""
        batch = is_batch(prompt)
        prompts = list(prompt) if batch else [prompt]
        if not prompts:
            raise ConfigError("the prompt list is empty; give at least one prompt")
        if self.split is not None:  # a split model runs its strategy directly (a list of prompts: one batch), in its turn
            params = self.params(**kwargs)
            rendered = [self.render(p, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs, system=system) for p in prompts]
            self._check_group()
            with self._driving():
                results = self.strategy.generate([ids for _, ids in rendered], params)
            results = [r if r.prompt else attrs_replace(r, prompt=text) for r, (text, _) in zip(results, rendered)]
            self.last_result = results[-1]
            return results if batch else results[0]
        handles: list[RequestHandle] = []
        try:
            for p in prompts:
                handles.append(self.submit(p, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs, system=system, **kwargs))
            results = [self._result(h) for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        self.last_result = results[-1]
        return results if batch else results[0]

    def stream(self, prompt: Prompt, *, chat_template: bool | None = None, chat_template_kwargs: dict | None = None,
               system: str | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield text pieces as they are decoded; the full result is then in `last_result`.

        Parameters and the prompt are checked now, before the first piece is asked for; closing
        the iterator early cancels the request."""
        handle = self.submit(prompt, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs, system=system, **kwargs)
        return self._stream(handle)

    def _stream(self, handle: RequestHandle) -> Iterator[str]:
        try:
            yield from handle
            self.last_result = self._result(handle)
        finally:
            handle.cancel()

    async def agenerate(self, prompt: Prompt, **kwargs: Any) -> GenerationResult:
        """generate for asyncio: one prompt, awaited without blocking the event loop."""
        handle = self.submit(prompt, **kwargs)
        try:
            return self._with_prompt(await handle.aresult(), handle)
        finally:
            handle.cancel()

    async def astream(self, prompt: Prompt, **kwargs: Any) -> AsyncIterator[str]:
        handle = self.submit(prompt, **kwargs)
        try:
            async for piece in handle.astream():
                yield piece
            self.last_result = self._with_prompt(handle.result(), handle)
        finally:
            handle.cancel()

    def _result(self, handle: RequestHandle) -> GenerationResult:
        return self._with_prompt(handle.result(), handle)

    @staticmethod
    def _with_prompt(result: GenerationResult, handle: RequestHandle) -> GenerationResult:
        return result if result.prompt else attrs_replace(result, prompt=handle.prompt)

    def metrics(self) -> dict[str, float]:
        """The scheduler's counters and gauges (see Scheduler.metrics); empty before first use."""
        return self._scheduler.metrics() if self._scheduler is not None else {}

    def close(self) -> None:
        """Stop the scheduler; requests still running end with an error. An Engine that split its
        model (parallel=) also ends the other processes (they leave their follower loop)."""
        if self._scheduler is not None:
            self._scheduler.close()
            watch = getattr(self.model, "watchdog", None)
            if watch is not None and self._scheduler.abandon in watch.on_stuck:
                watch.on_stuck.remove(self._scheduler.abandon)
            self._scheduler = None
        if self.split is not None and self._owns_split:
            from stratlm.distributed.group import group_lost

            if group_lost():  # nothing to tell the others; a stuck generation may hold the lock for ever
                return
            with self._drive_lock:  # after the generation in progress, if any
                self.model.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- a model split over processes ----------------------------------------------------------------
    @contextlib.contextmanager
    def _driving(self) -> Iterator[None]:
        """One generation on a split model. Alone: every rank replays one sequence of forwards, and
        MLX queues a thread's collectives on that thread's own stream, so two threads' forwards
        could reach the wire interleaved. Its waits on the group bounded by the watchdog, a lost
        process raised as one DistributedError, and every collective it queued done before the
        lock passes on (to a generation on another thread)."""
        import mlx.core as mx

        from stratlm.distributed.group import group_lost, peer_errors

        watch = getattr(self.model, "watchdog", None)
        with self._drive_lock:
            if watch is not None:
                watch.arm()
            try:
                with peer_errors(0):
                    yield
            finally:
                try:
                    if not group_lost():  # a collective on a broken group may never return
                        with peer_errors(0):
                            mx.synchronize()
                finally:
                    if watch is not None:
                        watch.disarm()

    def _check_group(self) -> None:
        """A group found broken fails every later request at once (a collective on it may never return)."""
        from stratlm.distributed.group import lost_error

        lost = lost_error()
        if lost is not None:
            raise type(lost)(str(lost))


class SplitDriven:
    """A strategy on a model split over processes, as the scheduler runs it: its stream runs inside
    the engine's `_driving` (alone, bounded, a lost process as DistributedError); all else is the
    strategy's own."""

    def __init__(self, strategy: Strategy, driving):
        self._strategy, self._driving = strategy, driving

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def stream(self, prompt: Sequence[int], params: GenerationParams) -> Iterator:
        with self._driving():
            yield from self._strategy.stream(prompt, params)


def load_split(model: Any, parallel: str, *, adapter: Any, transforms: Sequence[TransformSpec], **kwargs: Any) -> LoadedModel:
    """The model split over the launched processes (stratlm.distributed); on ranks past 0 this
    serves rank 0 and ends the process."""
    from stratlm.distributed import load_parallel

    if isinstance(model, LoadedModel):
        raise ConfigError("parallel= loads each process's part from the checkpoint: pass a model source (alias, hub id, folder, .gguf), not a loaded model")
    if adapter is not None or transforms:
        raise ConfigError("adapters and transforms are not applied to a model split over processes; "
                          "apply them first and save the result (stratlm transform ... --out DIR), then load DIR with parallel=")
    return load_parallel(model, parallel, **kwargs)


def make_params(default_temperature: float = 0.0, *, max_tokens: int = 256, temperature: float | None = None, top_k: int = 0,
                top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None, seed: int | None = None,
                stop: Sequence[str] | str = (), logprobs: bool = False, top_logprobs: int = 0, ignore_eos: bool = False) -> GenerationParams:
    """GenerationParams from flat keyword arguments (validated: bad values raise ConfigError)."""
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise ConfigError(f"logit_bias must be a dict of token id -> bias, e.g. {{50256: -100}}, got {type(logit_bias).__name__}")
    sampling = SamplingParams(temperature=default_temperature if temperature is None else temperature, top_k=top_k, top_p=top_p,
                              min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, logit_bias=logit_bias, seed=seed)
    params = GenerationParams(max_tokens=max_tokens, sampling=sampling, stop=stop, logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=ignore_eos)
    for text in params.stop:
        check_text(text, f"stop string {text!r}")
    return params


GENERATION_KEYWORDS = tuple(p for p in inspect.signature(make_params).parameters if p != "default_temperature")


def check_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """An unknown keyword of generate/stream is named with the nearest known one (not a TypeError)."""
    unknown = [k for k in kwargs if k not in GENERATION_KEYWORDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], GENERATION_KEYWORDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown generation argument {unknown[0]!r}{hint}; known: {', '.join(GENERATION_KEYWORDS)}, "
                          "chat_template, chat_template_kwargs, system, tools (submit: strategy, strategy_options)")
    return kwargs


def check_text(text: Any, what: str) -> str:
    """A string that encodes as UTF-8. Undecodable bytes from the command line or a file reach
    Python as lone surrogates (surrogateescape); name the first one's byte."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a string, got {type(text).__name__}: {text!r:.60}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise ConfigError(f"{what} is not valid UTF-8 text ({byte} at character {exc.start + 1}); give UTF-8 text") from exc
    return text


def is_batch(prompt: Any) -> bool:
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        return False
    return len(prompt) == 0 or not all(isinstance(m, dict) for m in prompt)


def attrs_replace(result: GenerationResult, **changes: Any) -> GenerationResult:
    import attrs

    return attrs.evolve(result, **changes)


def parse_transform(spec: TransformSpec) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict)):
        raise ConfigError(f"a transform is a name or (name, options), e.g. 'heal' or ('collapse', {{'n': 4}}), got {spec!r:.60}")
    name, options = spec
    return name, dict(options)


def transform_options(transform: Any) -> list[str] | None:
    """The keyword options a transform takes (None: it takes any, **options)."""
    try:
        parameters = list(inspect.signature(transform).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]  # the first is the model


def check_transform_options(name: str, transform: Any, options: dict) -> None:
    accepted = transform_options(transform)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ConfigError(f"transform {name!r} does not take option(s) {', '.join(unknown)}; it accepts: {', '.join(accepted) or 'none'}")


def apply_transforms(loaded: LoadedModel, transforms: Sequence[TransformSpec], registry: Registry) -> LoadedModel:
    for spec in transforms:
        name, options = parse_transform(spec)
        transform: Transform = registry.get("transform", name)
        check_transform_options(name, transform, options)
        loaded = transform(loaded, **options)
    return loaded


def apply_adapter(loaded: LoadedModel, path: Path, registry: Registry) -> LoadedModel:
    if not (path / "adapter_config.json").exists():
        raise ModelLoadError(f"{path} is not an adapter folder: it needs adapter_config.json and adapters.safetensors")
    try:
        result = registry.pm.hook.load_adapter(loaded=loaded, path=path)
    except StratlmError:
        raise
    except Exception as exc:  # a plugin's bug: name the hook and the error rather than crash
        plugins = ", ".join(impl.plugin_name for impl in registry.pm.hook.load_adapter.get_hookimpls())
        raise ModelLoadError(f"an adapter plugin failed on {path}: {type(exc).__name__}: {exc} (load_adapter plugins: {plugins})") from exc
    if result is None:
        raise ModelLoadError(f"no installed plugin reads the adapter in {path} (see its adapter_config.json fine_tune_type)")
    return result
