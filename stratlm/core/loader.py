"""The Loader interface: one kind of model source (a folder, a hub repo, a .gguf file, ...) read
into a LoadedModel. Loaders are registered by name through the `register_loaders` hook; the
first registered loader that claims a source reads it."""

from __future__ import annotations

import mlx.core as mx

from .model import LoadedModel
from .registry import Registry


class Loader:
    """Reads the sources it claims. `claims` looks at the source only (no reading, no download);
    `load` raises ModelLoadError naming what is wrong with a source it claimed."""

    name: str = ""

    def claims(self, source: str) -> bool:
        raise NotImplementedError

    def load(self, source: str, *, registry: Registry, dtype: mx.Dtype, keep_quantized: bool) -> LoadedModel:
        raise NotImplementedError
