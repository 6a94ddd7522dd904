"""The training config: a YAML file with LLaMA-Factory's key names, plus ``key=value`` overrides.

Example (``examples/train/tiny_full.yaml``)::

    model_name_or_path: tiny
    finetuning_type: full
    dataset: examples/train/tripod_faq.jsonl
    output_dir: var/train/tiny-full
    num_train_epochs: 60
    learning_rate: 3.0e-3

``load_config(path, overrides)`` returns a frozen ``TrainConfig``, or raises ``ConfigError`` naming every
unknown key and every bad value at once. It loads no model and writes nothing, so a typo costs nothing.
Relative paths are relative to the current directory, as in LLaMA-Factory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tripod.training.errors import ConfigError

FINETUNING_TYPES = ("full", "lora")
DATASET_FORMATS = ("messages", "alpaca", "sharegpt")
# transformers' schedulers that need nothing beyond the learning rate and warmup (no eval loop, no extra kwargs).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
REQUIRED = object()


@dataclass(frozen=True)
class TrainConfig:
    """A validated training config; everything inside the trainer trusts it."""

    model_name_or_path: str = "tiny"
    finetuning_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target: str | tuple[str, ...] = "all"
    merge_lora: bool = False
    dataset: str = ""
    dataset_format: str | None = None
    cutoff_len: int = 1024
    max_samples: int | None = None
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    logging_steps: int = 10
    save_steps: int = 500
    output_dir: str = ""
    overwrite_output_dir: bool = False
    seed: int = 42
    bf16: bool = False
    resume_from_checkpoint: str | bool | None = None

    @property
    def effective_lora_alpha(self) -> float:
        """``lora_alpha``, or twice the rank when unset (LLaMA-Factory's default)."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML values, for the ``TrainingRun`` record and ``train_config.yaml``."""
        data = dataclasses.asdict(self)
        if isinstance(self.lora_target, tuple):
            data["lora_target"] = list(self.lora_target)
        return data


# --- value parsers: each returns the typed value or raises ValueError with the reason ---------------------------


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _integer(minimum: int | None = None, allow: Iterable[int] = ()) -> Callable[[Any], int]:
    allowed = tuple(allow)

    def parse(value: Any) -> int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    number = None
                else:
                    number = int(as_float) if as_float.is_integer() else None
        if number is None:
            raise ValueError(f"expected an integer, got {_show(value)}")
        if number in allowed:
            return number
        if minimum is not None and number < minimum:
            also = f" (or {', '.join(map(str, allowed))})" if allowed else ""
            raise ValueError(f"must be at least {minimum}{also}, got {number}")
        return number

    return parse


def _number(
    low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {_show(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {_show(value)}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {_show(value)}")
        too_low = number <= low if low_open else number < low
        too_high = high is not None and (number >= high if high_open else number > high)
        if (too_low or too_high) and high is None:
            raise ValueError(f"must be {'greater than' if low_open else 'at least'} {low:g}, got {number:g}")
        if too_low or too_high:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"must be in {span}, got {number:g}")
        return number

    return parse


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"expected true or false, got {_show(value)}")


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if isinstance(value, str) and value in options:
            return value
        raise ValueError(f"must be one of {', '.join(options)}; got {_show(value)}")

    return parse


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        return None if value is None or value == "" else parse(value)

    return parse_optional


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_show(value)}")
    return value.strip()


def _absolute(value: Any) -> str:
    return str(Path(_text(value)).expanduser().resolve())


def _dataset_path(value: Any) -> str:
    path = Path(_absolute(value))
    if not path.exists():
        raise ValueError(f"no such file: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    return str(path)


def _model(value: Any) -> str:
    """``tiny``, a local model directory, or a hub id that ``from_pretrained`` will fetch."""
    name = _text(value)
    if name == "tiny":
        return name
    path = Path(name).expanduser()
    # A hub id is ``name`` or ``org/name``; anything else that names a path must exist here.
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if path.exists() or looks_local:
        if not path.is_dir():
            raise ValueError(f"no such model directory: {path.resolve()}")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path.resolve()} is not a model directory (it has no config.json)")
        return str(path.resolve())
    return name


def _lora_target(value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list) and all(isinstance(part, str) and part.strip() for part in value):
        names = [part.strip() for part in value]
    else:
        raise ValueError(f"expected 'all' or a list of module names, got {_show(value)}")
    if not names:
        raise ValueError("expected 'all' or a list of module names, got nothing")
    if names == ["all"]:
        return "all"
    if "all" in names:
        raise ValueError("'all' cannot be combined with module names")
    return tuple(names)


def _resume(value: Any) -> str | bool | None:
    if value is None or value is False or value == "":
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
        return True
    if isinstance(value, str) and value.strip().lower() == "false":
        return None
    path = Path(_absolute(value))
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"{path} is not a checkpoint directory (it has no trainer_state.json)")
    return str(path)


PARSERS: dict[str, Callable[[Any], Any]] = {
    "model_name_or_path": _model,
    "finetuning_type": _choice(FINETUNING_TYPES),
    "lora_rank": _integer(minimum=1),
    "lora_alpha": _optional(_number(0, None, low_open=True)),
    "lora_dropout": _number(0, 1, high_open=True),
    "lora_target": _lora_target,
    "merge_lora": _boolean,
    "dataset": _dataset_path,
    "dataset_format": _optional(_choice(DATASET_FORMATS)),
    "cutoff_len": _integer(minimum=2),
    "max_samples": _optional(_integer(minimum=1)),
    "num_train_epochs": _number(0, None, low_open=True),
    "max_steps": _integer(minimum=1, allow=(-1,)),
    "learning_rate": _number(0, None, low_open=True),
    "lr_scheduler_type": _choice(LR_SCHEDULERS),
    "warmup_ratio": _number(0, 1, high_open=True),
    "per_device_train_batch_size": _integer(minimum=1),
    "gradient_accumulation_steps": _integer(minimum=1),
    "logging_steps": _integer(minimum=1),
    "save_steps": _integer(minimum=0),
    "output_dir": _absolute,
    "overwrite_output_dir": _boolean,
    "seed": _integer(minimum=0),
    "bf16": _boolean,
    "resume_from_checkpoint": _resume,
}
KEYS = tuple(field.name for field in dataclasses.fields(TrainConfig))
assert set(PARSERS) == set(KEYS), "every config key needs a parser"
DEFAULTS: dict[str, Any] = {
    field.name: REQUIRED if field.name in ("dataset", "output_dir") else field.default
    for field in dataclasses.fields(TrainConfig)
}


# --- reading ------------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that reports a key given twice instead of silently keeping the last one."""

    duplicates: list[str]

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.duplicates.append(f"{key}: given twice (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The YAML mapping in ``path`` and its keys given twice; a missing or unreadable file is a ``ConfigError``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError([f"config file not found: {path.resolve()}"])
    loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"]) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}"])
    return data, loader.duplicates


def parse_overrides(overrides: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` strings from the command line; values are read as YAML (``true``, ``3``, ``[a, b]``)."""
    values: dict[str, Any] = {}
    errors: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append(f"override {item!r}: expected key=value")
            continue
        try:
            values[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            values[key] = raw
    return values, errors


def _unknown(key: Any) -> str:
    close = difflib.get_close_matches(str(key), KEYS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{key}: unknown key{hint}"


def validate(values: dict[str, Any]) -> TrainConfig:
    """Type every value, check it and the keys' combinations; raise ``ConfigError`` with all problems."""
    errors: list[str] = []
    parsed: dict[str, Any] = {}
    for key, value in values.items():
        if key not in PARSERS:
            errors.append(_unknown(key))
            continue
        try:
            parsed[key] = PARSERS[key](value)
        except ValueError as exc:
            errors.append(f"{key}: {exc}")
    for key in ("dataset", "output_dir"):
        if key not in values:
            errors.append(f"{key}: required")
    bad = {message.split(":", 1)[0] for message in errors}
    config = {k: DEFAULTS[k] for k in KEYS if DEFAULTS[k] is not REQUIRED} | parsed
    errors += _check_combinations(config, bad)
    if errors:
        raise ConfigError(errors)
    return TrainConfig(**config)


def _check_combinations(config: dict[str, Any], bad: set[str]) -> list[str]:
    errors: list[str] = []
    if config.get("merge_lora") and config.get("finetuning_type") == "full":
        errors.append("merge_lora: only applies to finetuning_type: lora")
    output = config.get("output_dir")
    resume = config.get("resume_from_checkpoint")
    if output and "output_dir" not in bad:
        out = Path(output)
        if out.exists() and not out.is_dir():
            errors.append(f"output_dir: {out} exists and is not a directory")
        elif resume is True and not any(out.glob("checkpoint-*/trainer_state.json")):
            errors.append(f"resume_from_checkpoint: true, but {out} has no checkpoint-* directory to resume from")
        elif out.is_dir() and any(out.iterdir()) and resume is None and not config.get("overwrite_output_dir"):
            errors.append(
                f"output_dir: {out} is not empty; set overwrite_output_dir: true to train into it anyway, "
                "or resume_from_checkpoint: true to continue its last checkpoint"
            )
    if config.get("bf16") and "bf16" not in bad:
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            errors.append("bf16: this GPU does not support bfloat16")
    return errors


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """The config in ``path`` (optional) with ``key=value`` overrides applied, validated as a whole."""
    values: dict[str, Any] = {}
    errors: list[str] = []
    if path is not None:
        values, errors = read_config_file(path)
    extra, override_errors = parse_overrides(overrides)
    errors += override_errors
    values = {**values, **extra}
    try:
        config = validate(values)
    except ConfigError as exc:
        raise ConfigError(errors + exc.errors) from None
    if errors:
        raise ConfigError(errors)
    return config
