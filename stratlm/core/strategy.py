"""The Strategy and Transform interfaces."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

from .errors import ConfigError
from .registry import Registry, get_registry
from .types import GenerationParams, GenerationResult

if TYPE_CHECKING:  # pragma: no cover
    from .model import LoadedModel


class Strategy:
    """Turns tokenized prompts and parameters into results (or a stream of text pieces).

    A strategy sees only the public Model interface (forward with a cache, make_cache) and
    the tokenizer; options it does not know are an error naming them.
    """

    name: str = ""
    #: Options this strategy accepts (keyword arguments of Engine / --option on the CLI).
    options: tuple[str, ...] = ()
    #: Temperature used when the caller does not give one (sampling strategies: > 0).
    default_temperature: float = 0.0

    def __init__(self, target: "LoadedModel", registry: "Registry | None" = None, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise ConfigError(f"strategy {self.name!r} does not take option(s) {', '.join(unknown)}; it accepts: {accepted}")
        self.target = target
        #: where named options (scorers, extractors, draft sources) are looked up: the Engine's registry
        self.registry = registry or get_registry()

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams) -> list[GenerationResult]:
        raise NotImplementedError

    def stream(self, prompt: Sequence[int], params: GenerationParams) -> Iterator[str | GenerationResult]:
        """Yield text pieces as they are decoded, then the final GenerationResult."""
        result = self.generate([prompt], params)[0]
        yield result.text
        yield result


class Transform(Protocol):
    """Model -> model: what `register_transforms` registers by name (collapse, heal, fuse, dora, ...)
    and the Engine composes at run time. Returns a new LoadedModel (or one whose layers are
    wrapped); never modifies its input or patches globals. Options come as keyword arguments
    (from the command line as text: "collapse:n=4,mode=drop")."""

    def __call__(self, loaded: "LoadedModel", /, **options: Any) -> "LoadedModel": ...
