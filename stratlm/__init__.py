"""stratlm: a plugin-based LLM inference engine on MLX."""

from stratlm.backends.cpu.blas import use_optimized_blas

use_optimized_blas()  # before mlx.core is imported anywhere: MLX binds cblas symbols at load

from stratlm.engine import Engine  # noqa: E402
from stratlm.core.model import LoadedModel  # noqa: E402
from stratlm.loaders.loading import load_model, save_model  # noqa: E402
from stratlm.core.types import GenerationParams, GenerationResult, GenerationStats, SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Engine", "LoadedModel", "load_model", "save_model", "GenerationParams", "GenerationResult", "GenerationStats", "SamplingParams"]
