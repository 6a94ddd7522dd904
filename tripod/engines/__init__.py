"""Engines behind the ``ChatModel`` contract, and the factory that shares one loaded instance per model.

Loading a model is slow and holds its weights in memory, so each process loads a model once, on first use, and every
request shares it; an engine's module is imported only when that engine is named.
"""

from __future__ import annotations

import importlib
import threading

from tripod.engines.base import ENGINE_MODULES, ChatModel, Delta, TokenStream

_instances: dict[tuple[str, str], ChatModel] = {}
_lock = threading.Lock()


def engine_class(engine: str) -> type[ChatModel]:
    """The ``ChatModel`` subclass for an engine name, without loading any model."""
    if engine in ENGINE_MODULES:
        importlib.import_module(ENGINE_MODULES[engine])
    try:
        return ChatModel.registry[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; known: {sorted(ENGINE_MODULES)}") from None


def loaded_chat_model(model_name: str | None = None, engine: str | None = None) -> ChatModel | None:
    """The shared instance if it is already loaded; never loads."""
    from tripod.conf import config

    cfg = config()
    return _instances.get((engine or cfg.engine, model_name or cfg.model))


def get_chat_model(model_name: str | None = None, engine: str | None = None) -> ChatModel:
    """The loaded, shared ``ChatModel`` for a model and engine; loads it on first use (blocking)."""
    from tripod.conf import config

    cfg = config()
    model_name = model_name or cfg.model
    engine = engine or cfg.engine
    key = (engine, model_name)
    with _lock:
        instance = _instances.get(key)
        if instance is None:
            instance = ChatModel(
                engine=engine,
                model_name=cfg.served_model_name if model_name == cfg.model else model_name,
                path=model_name,
                device=cfg.device,
                dtype=cfg.dtype,
                step_timeout=cfg.engine_step_timeout,
                cache_dir=cfg.cache_dir,
                adapter=cfg.adapter,
                cb_num_blocks=cfg.cb_num_blocks,
                cb_max_batch_tokens=cfg.cb_max_batch_tokens,
                cb_cuda_graph=cfg.cb_cuda_graph,
                cb_kv_padding=cfg.cb_kv_padding,
                cb_packed_gqa=cfg.cb_packed_gqa,
                cb_split_keys=cfg.cb_split_keys,
                tool_parser=cfg.tool_parser,
                upstream_url=cfg.upstream_url,
                upstream_api_key=cfg.upstream_api_key,
            )
            instance.load()
            _instances[key] = instance
        return instance


__all__ = ["ChatModel", "Delta", "TokenStream", "engine_class", "get_chat_model", "loaded_chat_model"]
