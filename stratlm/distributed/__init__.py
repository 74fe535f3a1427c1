"""Tensor- and pipeline-parallel inference over mx.distributed (docs/distributed.md).

Run the same program on every process (`mlx.launch -n 2 ...`): `load_parallel` (or
`Engine(parallel=...)`) reads this rank's part of the checkpoint; on rank 0 it returns a
LoadedModel whose model hides the split (strategies use it unchanged), on the others it follows
rank 0's forwards and then ends the process (SystemExit(0)) when rank 0 is done.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from stratlm.backends.cpu import kernels
from stratlm.backends.cpu.quantized import use_cpu_kernels
from stratlm.core.errors import ConfigError
from stratlm.core.log import get_logger
from stratlm.core.model import LoadedModel
from stratlm.core.registry import Registry, get_registry
from stratlm.device import cpu_active

from .group import DistributedError, init_group, peer_errors
from .loading import build_shard, shard_folder_weights, shard_loaded_weights
from .plan import MODES, ShardPlan, make_plan
from .runtime import ParallelModel, serve, wire_tensor_parallel

log = get_logger(__name__)

__all__ = ["DistributedError", "ParallelModel", "ShardPlan", "init_group", "load_parallel", "make_plan", "peer_errors", "split_model"]


def load_parallel(source: str | None, parallel: str, *, dtype: str | mx.Dtype | None = None, quantized: str | None = None,
                  registry: Registry | None = None, micro_batches: int | None = None, backend: str = "any",
                  exit_when_done: bool = True, tokenizer: bool = True) -> LoadedModel | None:
    """This rank's part of the model. Rank 0 gets the LoadedModel (tokenizer included); the other
    ranks serve rank 0 and raise SystemExit(0) when it closes (exit_when_done=False: return None
    then, to load another model). One process: the whole model.
    tokenizer=False: rank 0 skips reading the tokenizer (using the model alone).
    micro_batches (pipeline): how many pieces a batch's rows are cut into (default: the number of processes)."""
    from stratlm.loaders.folder import folder_tokenizer, quantization_group_size, read_config, safetensors_paths
    from stratlm.loaders.gguf import GGUF_GROUP_SIZE, model_tokenizer, read_model_tensors
    from stratlm.loaders.hub import download
    from stratlm.loaders.loading import family_for, load_model, parse_dtype, resolve

    if parallel not in MODES:
        raise ConfigError(f"parallel must be one of {', '.join(MODES)}, got {parallel!r}")
    if micro_batches is not None and (not isinstance(micro_batches, int) or micro_batches < 1):
        raise ConfigError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    registry = registry or get_registry()
    group = init_group(backend)
    rank, size = group.rank(), group.size()
    if size == 1:
        log.debug("one process: nothing to split", parallel=parallel)
        return load_model(source, dtype=dtype, quantized=quantized, registry=registry)
    mx_dtype = parse_dtype(dtype)
    if quantized not in (None, "keep", "dequantize"):
        raise ConfigError(f"quantized must be 'keep' or 'dequantize', got {quantized!r}")
    keep = (quantized == "keep") if quantized else (not cpu_active() or kernels.available())
    kind, location = resolve(source, registry)
    with peer_errors(rank):
        if kind == "hub":  # rank 0 downloads first, the others then find the files in the cache (same host)
            if rank == 0:
                location = download(str(location))
            mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))
            if rank != 0:
                location = download(str(location))
        path = Path(location)
        if path.is_dir():
            config = read_config(path)
            family = family_for(config, registry)
            group_size = quantization_group_size(config)
            plan = make_plan(parallel, config, rank, size, group_size)
            weights = shard_folder_weights(safetensors_paths(path), plan, group_size)
            tok = folder_tokenizer(path) if rank == 0 and tokenizer else None
        elif path.suffix == ".gguf":
            family, config, weights, meta = read_model_tensors(path, registry, keep_quantized=True)  # cut before any expansion
            group_size = GGUF_GROUP_SIZE if any(k.endswith(".scales") for k in weights) else None
            plan = make_plan(parallel, config, rank, size, group_size)
            weights = shard_loaded_weights(weights, plan, group_size)
            tok = model_tokenizer(path, family, meta) if rank == 0 and tokenizer else None
        else:
            raise ConfigError(f"parallel loading reads model folders, hub repos and .gguf files, not {kind} sources ({source})")
    return split_model(plan, config, weights, family, group, dtype=mx_dtype, group_size=group_size, keep_quantized=keep, where=str(path),
                       tokenizer=tok, source=source or str(location), path=path, micro_batches=micro_batches, exit_when_done=exit_when_done)


def split_model(plan: ShardPlan, config: dict, weights: dict[str, mx.array], family, group: mx.distributed.Group, *, dtype: mx.Dtype,
                group_size: int | None = None, keep_quantized: bool = True, where: str = "", tokenizer=None, source: str = "",
                path: Path | None = None, micro_batches: int | None = None, exit_when_done: bool = True) -> LoadedModel | None:
    """Build this rank's part from its tensors (`weights`: the plan's pieces, under the names of
    this rank's model), then as load_parallel: rank 0 gets the LoadedModel, the others serve."""
    rank, size = group.rank(), group.size()
    with peer_errors(rank):
        local = build_shard(plan, config, weights, family, dtype=dtype, group_size=group_size, keep_quantized=keep_quantized, where=where)
        weights.clear()  # the model holds what it needs; the caller's dict must not keep the rest alive
        if keep_quantized:
            use_cpu_kernels(local, dtype)
        if plan.mode == "tensor":
            wire_tensor_parallel(local, group)
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))  # every rank loaded
    log.debug("loaded part", rank=rank, size=size, plan=str(plan))
    if rank != 0:
        serve(local, plan, group, config, dtype)
        if exit_when_done:
            raise SystemExit(0)
        return None
    model = ParallelModel(local, plan, group, config, dtype, micro_batches)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, source=source, path=path)
