"""speculative: a draft proposes tokens, the target checks them all in one forward.

Draft sources are plugins (`register_draft_sources`): register(name, factory) where
factory(target: LoadedModel, spec) returns an object with
    reset()                                   - a new sequence starts
    propose(sequence, k, sampler) -> (tokens, logprobs)
tokens: up to k proposed next tokens; logprobs: the (len(tokens), vocab) distributions they
were sampled from, or None for deterministic proposals (a point mass).
The `draft` option picks one: "NAME" or "NAME:SPEC" for a registered source (spec = the text
after the colon, e.g. "lookup:2"); anything else is a model source for the "model" source,
whose factory also takes a LoadedModel (so a plugin can build a transformed draft itself).

Verification is standard speculative sampling: accept draft token x with probability
min(1, p(x)/q(x)); on rejection sample from normalize(max(0, p - q)); a bonus token from the
target when every draft token is accepted. At temperature 0 that is: keep the draft tokens
that equal the target's argmax. Rejected positions are trimmed from the caches.
On CPU a forward of several tokens costs several times one of a single token, so after a draft
less than half accepted, drafting pauses for 1, 2, 4 ... (at most 8) plain steps.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Protocol, Sequence

import attrs
import mlx.core as mx

from stratlm.core.errors import ConfigError
from stratlm.decoding.completion import complete
from stratlm.decoding.loop import prefill, token_logprobs, within_context
from stratlm.core.model import LoadedModel
from stratlm.loaders.loading import load_model
from stratlm.core.registry import Registry
from stratlm.decoding.sampler import Sampler
from stratlm.decoding.speculation import common_prefix_length, process_positions, verify
from stratlm.core.strategy import RequestPolicy, Strategy
from stratlm.core.types import GenerationParams, GenerationResult

from .batched import check_prompts
from .options import int_option

DraftProposal = tuple[Sequence[int], "mx.array | None"]


class DraftSource(Protocol):
    def reset(self) -> None: ...

    def propose(self, sequence: Sequence[int], k: int, sampler: Sampler) -> DraftProposal: ...


# -- draft sources ---------------------------------------------------------------------------------
class ModelDraft:
    """A smaller model sharing the target's tokenizer; its cache follows the sequence (trimmed, never recomputed)."""

    def __init__(self, target: LoadedModel, draft: LoadedModel):
        check_same_vocabulary(target, draft)
        self.model = draft.model
        mx.eval(self.model.parameters())  # made on the caller's thread, run on the scheduler's: nothing lazy may cross
        self.source = draft.source
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.cached: list[int] = []  # the tokens whose keys/values the cache holds

    def propose(self, sequence: Sequence[int], k: int, sampler: Sampler) -> DraftProposal:
        keep = min(common_prefix_length(self.cached, sequence), len(sequence) - 1)
        for layer_cache in self.cache:
            layer_cache.trim(len(self.cached) - keep)
        logits = prefill(self.model, mx.array([list(sequence[keep:])], dtype=mx.int32), self.cache)
        tokens, dists = [], []
        for i in range(k):  # built lazily, evaluated once
            if i:
                logits = self.model(tokens[-1][:, None], self.cache)[:, -1, :]
            if sampler.params.greedy:
                tokens.append(mx.argmax(logits, axis=-1).astype(mx.int32))
            else:
                dist = sampler.distribution(logits)
                dists.append(dist)
                tokens.append(mx.random.categorical(dist, axis=-1, key=sampler.next_key()).astype(mx.int32))
        mx.eval(tokens, dists)
        proposed = [int(t.item()) for t in tokens]
        self.cached = list(sequence) + proposed[:-1]
        return proposed, (mx.concatenate(dists, axis=0) if dists else None)


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    t_size, d_size = target.model.vocab_size, draft.model.vocab_size
    if t_size != d_size:
        raise ConfigError(f"draft model {draft.source!r} has a vocabulary of {d_size} tokens, the target {target.source!r} has {t_size}: "
                          "option draft needs a model with the target's tokenizer (e.g. a smaller model of the same family)")
    if target.tokenizer.hf.get_vocab() != draft.tokenizer.hf.get_vocab():
        raise ConfigError(f"draft model {draft.source!r} has another tokenizer than the target {target.source!r} (other tokens or ids): "
                          "option draft needs a model with the target's tokenizer")


def model_draft(target: LoadedModel, spec: str | LoadedModel) -> ModelDraft:
    """Factory of the "model" source: spec is a model source (alias, folder, .gguf, hub id) or a LoadedModel."""
    if isinstance(spec, LoadedModel):
        return ModelDraft(target, spec)
    if not spec:
        raise ConfigError("option draft='model:SOURCE' needs a model source after the colon (alias, folder, .gguf file or hub id)")
    return ModelDraft(target, load_model(spec))


class LookupDraft:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (n = max_ngram down to min_ngram) and propose the tokens that followed it. No model needed.
    A single-token match is mostly a wrong guess in free text, and on CPU a wrong guess costs
    (a forward of several tokens is slower than one of a single token), so min_ngram is 2."""

    #: a lookup draft costs nothing to make, and a copied span is usually long: draft further
    preferred_num_draft = 8
    #: proposals depend on the sequence only (no model, no state): the scheduler runs it in its batch
    stateless = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min(min_ngram, max_ngram)

    def reset(self) -> None:
        pass

    def propose(self, sequence: Sequence[int], k: int, sampler: Sampler) -> DraftProposal:
        seq = list(sequence)
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            pattern = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):  # latest first; at least one token must follow
                if seq[start : start + n] == pattern:
                    return seq[start + n : start + n + k], None
        return [], None


def lookup_draft(target: LoadedModel, spec: str) -> LookupDraft:
    """Factory of the "lookup" source: spec is the longest n-gram to match (default 3; the shortest is 2, or 1 for "lookup:1")."""
    return LookupDraft(int_option("speculative", "draft='lookup:N' (N, the longest n-gram)", spec) if spec else 3)


DRAFT_SOURCES = {"model": model_draft, "lookup": lookup_draft}


def make_draft(target: LoadedModel, draft: Any, registry: Registry) -> DraftSource:
    if isinstance(draft, LoadedModel):
        return registry.get("draft source", "model")(target, draft)
    if not isinstance(draft, str) or not draft:
        raise ConfigError(f"strategy 'speculative': option draft must be 'lookup', 'NAME:SPEC' of a registered draft source or a model source, got {draft!r}")
    sources = registry.table("draft source")
    name, _, spec = draft.partition(":")
    if name in sources:
        return sources[name].obj(target, spec)
    return registry.get("draft source", "model")(target, draft)


# -- decoding ------------------------------------------------------------------------------------
@attrs.define
class SpeculativeCounts:
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0  # verification forwards (the prefill not counted)
    tokens_from_verification: int = 0
    draft_time: float = 0.0
    target_time: float = 0.0

    def as_extra(self) -> dict[str, float]:
        return {
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "tokens_per_target_forward": self.tokens_from_verification / self.target_forwards if self.target_forwards else 0.0,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "target_forwards": self.target_forwards,
            "draft_time": self.draft_time,
            "target_time": self.target_time,
        }


MAX_PAUSE = 8  # the longest run of plain steps after repeated useless drafts


def max_trims(cache: list) -> list[int]:
    return [c.max_trim for c in cache if getattr(c, "max_trim", None) is not None]


def next_pause(backoff: int, drafted: int, accepted: int) -> int:
    """Plain steps before the next draft: a forward over k+1 tokens costs several single-token
    ones on CPU, so a draft less than half accepted did not pay for itself: back off."""
    return 0 if 2 * accepted >= drafted else min(2 * backoff or 1, MAX_PAUSE)


class DraftPolicy(RequestPolicy):
    """Speculative decoding of one request inside the scheduler's batch, for a stateless draft
    source: each row proposes from its own tokens, and the batch's forward verifies every row's
    draft (rows verify different numbers of tokens in the same forward)."""

    def __init__(self, params: GenerationParams, draft: DraftSource, num_draft: int):
        super().__init__(params)
        self.draft, self.num_draft = draft, num_draft
        self.counts = SpeculativeCounts()
        self.pause = self.backoff = 0

    def propose(self, row: int, sequence: Sequence[int], budget: int) -> list[int]:
        if self.pause:
            self.pause -= 1
            return []
        tokens, _ = self.draft.propose(sequence, min(self.num_draft, budget), None)
        return list(tokens)

    def verified(self, row: int, drafted: int, accepted: int) -> None:
        c = self.counts
        c.drafted += drafted
        c.accepted += accepted
        c.target_forwards += 1
        c.tokens_from_verification += accepted + 1
        self.backoff = self.pause = next_pause(self.backoff, drafted, accepted)

    def finish(self, results: list[GenerationResult]) -> GenerationResult:
        result = results[0]
        return attrs.evolve(result, extra={**result.extra, **self.counts.as_extra()})


def speculative_decode(
    model: Any,
    prompt: Sequence[int],
    sampler: Sampler,
    draft: DraftSource,
    num_draft: int,
    max_tokens: int,
    counts: SpeculativeCounts,
    logprobs: bool = False,
) -> Iterator[tuple[int, float | None]]:
    """Yield (token, raw target log-probability or None) until max_tokens; the caller may stop earlier."""
    cache = model.make_cache()
    draft.reset()
    # a cache that can take back only so many positions (a sliding window's ring), the target's or
    # a draft model's, bounds the drafts
    num_draft = min([num_draft] + max_trims(cache) + max_trims(getattr(draft, "cache", None) or []))
    start = time.perf_counter()
    logits = prefill(model, mx.array([list(prompt)], dtype=mx.int32), cache)
    token = sampler.sample(logits, sampler.start_history(mx.array([list(prompt)], dtype=mx.int32)))
    lp = token_logprobs(logits, token) if logprobs else None
    sequence = list(prompt) + [int(token.item())]
    counts.target_time += time.perf_counter() - start
    yield sequence[-1], (float(lp.item()) if lp is not None else None)
    emitted = 1
    pause = backoff = 0  # steps left without drafting; how long the next pause is
    while emitted < max_tokens:
        k = 0 if pause else min(num_draft, max_tokens - emitted - 1)  # drafts beyond the budget would be wasted
        pause = max(0, pause - 1)
        start = time.perf_counter()
        drafted, draft_logprobs = draft.propose(sequence, k, sampler) if k > 0 else ([], None)
        drafted = list(drafted)[:k]
        draft_logprobs = draft_logprobs[: len(drafted)] if draft_logprobs is not None else None
        checked = time.perf_counter()
        logits = model(mx.array([[sequence[-1]] + drafted], dtype=mx.int32), cache)[0]
        n, following = verify(process_positions(logits, sequence, drafted, sampler, len(prompt)), drafted, draft_logprobs, sampler)
        for layer_cache in cache:
            layer_cache.trim(len(drafted) - n)
        out = drafted[:n] + [following]
        lps = token_logprobs(logits[: n + 1], mx.array(out, dtype=mx.int32)).tolist() if logprobs else [None] * len(out)
        counts.draft_time += checked - start
        counts.target_time += time.perf_counter() - checked
        counts.drafted += len(drafted)
        counts.accepted += n
        counts.target_forwards += 1
        counts.tokens_from_verification += len(out)
        if drafted:
            backoff = pause = next_pause(backoff, len(drafted), n)
        sequence += out
        for pair in zip(out, lps):
            yield pair
        emitted += len(out)


class Speculative(Strategy):
    """Draft-then-verify decoding; output distribution equals the target's (identical at temperature 0)."""

    name = "speculative"
    options = ("draft", "num_draft")
    default_temperature = 0.0

    def __init__(self, target: LoadedModel, draft: str | LoadedModel = "lookup", num_draft: int | str | None = None, **options: Any):
        super().__init__(target, **options)
        if num_draft is not None:
            num_draft = int_option(self.name, "num_draft", num_draft)
        self.draft = make_draft(target, draft, self.registry)
        # default: what the draft source prefers (prompt lookup 8), else 4
        self.num_draft = num_draft or getattr(self.draft, "preferred_num_draft", 4)

    def policy(self, prompt: Sequence[int], params: GenerationParams) -> RequestPolicy | None:
        if not getattr(self.draft, "stateless", False):
            return None  # a draft model keeps its own cache: the serial loop runs it
        return DraftPolicy(params, self.draft, self.num_draft)

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams) -> list[GenerationResult]:
        check_prompts(prompts)
        return [list(self.stream(p, params))[-1] for p in prompts]

    def stream(self, prompt: Sequence[int], params: GenerationParams) -> Iterator[str | GenerationResult]:
        check_prompts([prompt])
        t = self.target
        params = within_context(params, len(prompt), t.context_length)
        sampler = Sampler(params.sampling, self.registry)
        counts = SpeculativeCounts()
        tokens = speculative_decode(t.model, prompt, sampler, self.draft, self.num_draft, params.max_tokens, counts, params.logprobs)
        yield from complete(tokens, t.tokenizer, t.eos_token_ids, len(prompt), params, extra=counts.as_extra)
