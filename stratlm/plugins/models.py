"""Built-in model families and the loaders of the formats they come in, registered through the
same entry-point group as any plugin."""

from stratlm.core.hookspecs import hookimpl
from stratlm.loaders.folder import FolderLoader
from stratlm.loaders.gguf import GGUFLoader
from stratlm.loaders.hub import HubLoader
from stratlm.models import gemma3, granite, llama, mistral, olmo2, phi3, qwen2, qwen3, qwen3_moe, smollm3

FAMILIES = (llama, qwen3, qwen2, mistral, gemma3, phi3, qwen3_moe, olmo2, granite, smollm3)


@hookimpl
def register_model_families(register):
    for module in FAMILIES:
        register(module.FAMILY)


@hookimpl
def register_model_aliases(register):
    for module in FAMILIES:
        for alias, source in module.ALIASES.items():
            register(alias, source)


@hookimpl
def register_loaders(register):
    for loader in (GGUFLoader(), FolderLoader(), HubLoader()):
        register(loader)
