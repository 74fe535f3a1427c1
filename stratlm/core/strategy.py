"""The Strategy and Transform interfaces."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

from .errors import ConfigError
from .registry import Registry, get_registry
from .types import GenerationParams, GenerationResult

if TYPE_CHECKING:  # pragma: no cover
    from .model import LoadedModel


class RequestPolicy:
    """How the scheduler runs one request of a strategy inside the shared decode batch.

    The scheduler prefills the prompt once and decodes `rows` rows from it; each step it asks
    `propose` for draft tokens a row's next forward verifies (none: a plain step), reports the
    verdict to `verified`, and when every row has finished, `finish` turns the rows' results
    into the request's one result. Rows are sampled with `params`; row r's seed is seed + r, so
    rows differ and a seeded request gives the same output whatever else shares the batch.
    """

    def __init__(self, params: GenerationParams, rows: int = 1):
        self.params, self.rows = params, rows

    @property
    def streams(self) -> bool:
        """Whether text pieces reach the caller as decoded (one row), or only the final text."""
        return self.rows == 1

    def propose(self, row: int, sequence: Sequence[int], budget: int) -> list[int]:
        """Deterministic draft tokens (at most `budget`) for the row whose tokens so far are `sequence`."""
        return []

    def verified(self, row: int, drafted: int, accepted: int) -> None:
        """The row's forward checked `drafted` draft tokens and kept `accepted` of them."""

    def finish(self, results: list[GenerationResult]) -> GenerationResult:
        return results[0]


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

    def policy(self, prompt: Sequence[int], params: GenerationParams) -> RequestPolicy | None:
        """How the scheduler runs this request in the shared batch; None: it cannot, and the
        scheduler runs `stream` for it between batch steps (correct, but not batched)."""
        return None

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
