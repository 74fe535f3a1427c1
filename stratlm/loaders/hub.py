"""The hub loader: a Hugging Face repo id ("org/name") downloaded with huggingface_hub (only the
files a model folder needs, honouring its cache and HF_HUB_OFFLINE), then read as a folder."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from stratlm.core.errors import ModelLoadError
from stratlm.core.loader import Loader
from stratlm.core.model import LoadedModel
from stratlm.core.registry import Registry

from .folder import load_folder

HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]


class HubLoader(Loader):
    name = "hub"

    def claims(self, source: str) -> bool:
        return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).expanduser().exists()

    def load(self, source: str, *, registry: Registry, dtype: mx.Dtype, keep_quantized: bool) -> LoadedModel:
        return load_folder(download(source), registry, dtype, keep_quantized, source=source)


def download(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"no model {repo_id!r} on the Hugging Face hub (or it is private): check the repo id") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached (offline or HF_HUB_OFFLINE=1); "
                             "pass a local folder or .gguf file instead") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"downloading {repo_id!r} failed: {exc}") from exc
