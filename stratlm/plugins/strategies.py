"""Built-in decoding strategies and their parts (scorers, answer extractors, draft sources,
logits processors), registered through the `stratlm` entry-point group."""

from stratlm.core.hookspecs import hookimpl
from stratlm.decoding.processors import BUILTIN as LOGITS_PROCESSORS
from stratlm.strategies.batched import Batch
from stratlm.strategies.best_of_n import SCORERS, BestOfN
from stratlm.strategies.single import Sample, SingleSequence
from stratlm.strategies.speculative import DRAFT_SOURCES, Speculative
from stratlm.strategies.vote import EXTRACTORS, Vote

STRATEGIES = (SingleSequence, Sample, Batch, BestOfN, Vote, Speculative)


@hookimpl
def register_strategies(register):
    for strategy in STRATEGIES:
        register(strategy.name, strategy)


@hookimpl
def register_scorers(register):
    for name, scorer in SCORERS.items():
        register(name, scorer)


@hookimpl
def register_answer_extractors(register):
    for name, extractor in EXTRACTORS.items():
        register(name, extractor)


@hookimpl
def register_draft_sources(register):
    for name, factory in DRAFT_SOURCES.items():
        register(name, factory)


@hookimpl
def register_logits_processors(register):
    for name, factory in LOGITS_PROCESSORS.items():
        register(name, factory)
