"""Tiny real models for tests and plugin authors: random weights, a real byte-level tokenizer.

Nothing is mocked: these are ordinary Llama/Qwen3 models of a few thousand parameters
that run through the same code paths as a downloaded checkpoint.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from stratlm.core.model import LoadedModel
from stratlm.loaders.loading import build_model, family_for
from stratlm.core.registry import Registry, get_registry
from stratlm.core.tokenizer import Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Tokenizer:
    """256 byte tokens (ids 0-255, GPT-2 byte alphabet) then the special tokens; eos = <|im_end|>."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    order = sorted(alphabet, key=lambda ch: _byte_of(ch))
    rust = RustTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(order)}, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template)
    return Tokenizer(hf)


def _byte_of(ch: str) -> int:
    # GPT-2's byte->unicode map: printable bytes map to themselves, the rest to 256+
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tiny_config(family: str = "llama", **overrides: Any) -> dict[str, Any]:
    config = {
        "model_type": family,
        "vocab_size": 256 + len(SPECIAL_TOKENS),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    }
    config.update(overrides)
    return config


def tiny_model(family: str = "llama", seed: int = 0, registry: Registry | None = None, **overrides: Any) -> LoadedModel:
    """A LoadedModel with random weights (seeded) and the byte tokenizer."""
    registry = registry or get_registry()
    config = tiny_config(family, **overrides)
    mx.random.seed(seed)
    model = build_model(config, registry)
    return LoadedModel(model=model, tokenizer=byte_tokenizer(), family=family_for(config, registry), source=f"tiny-{family}-{seed}")


def write_plugin_distribution(root, dist_name: str, modules: dict[str, str], entry_points: dict[str, str]):
    """Write an installed-looking distribution under `root` (a folder to put on sys.path).

    modules: module name -> source; entry_points: entry name -> "module" (group `stratlm`).
    This is how a third-party plugin package looks to importlib.metadata once pip-installed.
    """
    from pathlib import Path

    root = Path(root)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)
    info = root / f"{dist_name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[stratlm]\n{lines}\n")
    return root
