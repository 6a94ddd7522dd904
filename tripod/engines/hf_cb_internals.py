"""The transformers internals ``hf-cb`` reaches past the public API, and the guard that checks them at load.

Continuous batching's manager, output router, logits-processor hooks, CUDA graph store and SDPA function are
transformers internals that can move in any release. ``check_transformers`` runs when the engine loads and, if one is
gone, fails with an ``EngineFailure`` naming the transformers versions this engine was written against, instead of an
``AttributeError`` deep inside a request. The range holds the version ``requirements.txt`` pins.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any

import transformers
from packaging.version import Version

from tripod.errors import EngineFailure

logger = logging.getLogger(__name__)

# The transformers releases hf-cb was written and tested against: [lowest, below). requirements.txt pins 5.24.0.
SUPPORTED_TRANSFORMERS = ("5.24", "5.25")
SUPPORTED_RANGE = f">={SUPPORTED_TRANSFORMERS[0]},<{SUPPORTED_TRANSFORMERS[1]}"

_CB = "transformers.generation.continuous_batching"
# Every private name hf-cb uses, as (module, dotted path from it).
REQUIRED: tuple[tuple[str, str], ...] = (
    ("transformers.generation.configuration_utils", "ContinuousBatchingConfig.cuda_graph_booleans"),
    ("transformers.generation.configuration_utils", "ContinuousBatchingConfig.kv_padding_interval_size"),
    ("transformers.generation.configuration_utils", "ContinuousBatchingConfig.varlen_compile_config"),
    ("transformers.generation.configuration_utils", "ContinuousBatchingConfig.decode_compile_config"),
    ("transformers.generation.configuration_utils", "ContinuousBatchingConfig.use_async_batching"),
    ("transformers.generation.configuration_utils", "ContinuousBatchingConfig.per_request_processors"),
    (f"{_CB}.cb_logits_processors", "ContinuousBatchingLogitsProcessor.prepare_tensor_args"),
    (f"{_CB}.cb_logits_processors", "ContinuousBatchingLogitsProcessorList.prepare_tensor_args"),
    (f"{_CB}.cb_logits_processors", "ContinuousBatchingTemperatureLogitsWarper"),
    (f"{_CB}.cb_logits_processors", "ContinuousBatchingTopKLogitsWarper"),
    (f"{_CB}.cb_logits_processors", "ContinuousBatchingTopPLogitsWarper"),
    (f"{_CB}.utils", "CudaGraphBuffer.get_graph"),
    (f"{_CB}.utils", "CudaGraphBuffer.set_graph"),
    (f"{_CB}.continuous_api", "ContinuousMixin.init_continuous_batching"),
    (f"{_CB}.continuous_api", "ContinuousMixin.destroy_cached_continuous_batching_manager"),
    (f"{_CB}.continuous_api", "ContinuousBatchingManager._create_batch_processor"),
    (f"{_CB}.continuous_api", "ContinuousBatchingManager.add_request"),
    (f"{_CB}.continuous_api", "ContinuousBatchingManager.cancel_request"),
    (f"{_CB}.continuous_api", "ContinuousBatchingManager.is_running"),
    (f"{_CB}.continuous_api", "ContinuousBatchingManager.start"),
    (f"{_CB}.continuous_api", "ContinuousBatchingManager.stop"),
    (f"{_CB}.model_runner", "ModelRunner._get_forward_fn"),
    (f"{_CB}.model_runner", "ModelRunner._forward_process_and_sample"),
    (f"{_CB}.requests", "RequestState.initial_tokens"),
    (f"{_CB}.requests", "RequestState.position_offset"),
    (f"{_CB}.requests", "RequestState.logit_processor_kwargs"),
    (f"{_CB}.requests", "FutureRequestState.has_new_token"),
    ("transformers.integrations.sdpa_attention", "sdpa_attention_forward"),
    ("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS"),
)
# What a started manager must carry (attributes set in its __init__, so not on the class).
REQUIRED_ON_MANAGER = (
    "output_router._lock",
    "output_router.result_handlers",
    "background_thread_status.fatal_error",
    "continuous_batching_config",
    "logit_processor",
)


def _has(obj: Any, name: str) -> bool:
    if hasattr(obj, name):
        return True
    # A dataclass field without a class-level default (or with a default factory) is not a class attribute.
    return dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}


def _resolves(obj: Any, path: str) -> bool:
    for name in path.split("."):
        if not _has(obj, name):
            return False
        obj = getattr(obj, name, None)
    return True


def _module(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _fail(missing: list[str]) -> EngineFailure:
    return EngineFailure(
        f"The hf-cb engine was written against transformers {SUPPORTED_RANGE} (requirements.txt pins it), but the"
        f" installed transformers {transformers.__version__} lacks {', '.join(missing)}. Install transformers"
        f" {SUPPORTED_RANGE}, or use TRIPOD_ENGINE=hf.",
        code="unsupported_transformers_version",
    )


def check_transformers() -> None:
    """Raise ``EngineFailure`` if a transformers internal hf-cb uses is gone; warn outside the tested versions."""
    missing = []
    for module_name, path in REQUIRED:
        module = _module(module_name)
        if module is None or not _resolves(module, path):
            missing.append(f"{module_name}.{path}")
    if missing:
        raise _fail(missing)
    installed = Version(transformers.__version__)
    low, below = (Version(v) for v in SUPPORTED_TRANSFORMERS)
    if not low <= installed < below:
        logger.warning(
            "hf-cb was written against transformers %s; transformers %s has every internal it uses, but is untested",
            SUPPORTED_RANGE,
            installed,
        )


def check_manager(manager: Any) -> None:
    """Raise ``EngineFailure`` if a new ``ContinuousBatchingManager`` lacks an attribute hf-cb reads or wraps."""
    missing = [f"ContinuousBatchingManager.{path}" for path in REQUIRED_ON_MANAGER if not _resolves(manager, path)]
    if missing:
        raise _fail(missing)
