"""Built-in decoding strategies, registered through the `stratlm` entry-point group."""

from stratlm.core.hookspecs import hookimpl
from stratlm.strategies.greedy import Greedy, Sample

STRATEGIES = (Greedy, Sample)


@hookimpl
def register_strategies(register):
    for strategy in STRATEGIES:
        register(strategy.name, strategy)
