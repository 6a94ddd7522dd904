"""Supervised fine-tuning on transformers' ``Trainer`` (and ``peft`` for LoRA), behind both entry points.

``train(config)`` reads and checks the dataset first (a bad line costs nothing), records a ``TrainingRun``,
trains, and leaves in ``output_dir`` what the server loads as is: a model directory (``TRIPOD_MODEL=<dir>``),
or a LoRA adapter (``TRIPOD_MODEL=<base> TRIPOD_ADAPTER=<dir>``). Next to it: ``checkpoint-N/`` directories,
``trainer_log.jsonl``, ``training_loss.png``, ``train_config.yaml`` and ``train_results.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from django.db import DatabaseError, connection

from tripod.training.config import TrainConfig
from tripod.training.datasets import Conversation, load_conversations
from tripod.training.errors import TrainingError
from tripod.training.losslog import LossLog, plot_losses
from tripod.training.models import TrainingRun

logger = logging.getLogger(__name__)

CONFIG_NAME = "train_config.yaml"
# Final-model files of one kind that must not linger next to the other: transformers reads a directory with
# adapter_config.json as an adapter, and a stale full model beside an adapter misleads.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
FULL_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class TrainResult:
    """Where the trained model is and how training ended."""

    run_id: int
    output_dir: Path
    adapter: bool
    global_step: int
    final_loss: float | None
    examples: int


def ensure_run_table() -> None:
    """Fail before training, with the fix, when the database has not been migrated."""
    try:
        tables = connection.introspection.table_names()
    except DatabaseError as exc:
        raise TrainingError(f"The database cannot be opened to record the run: {exc}") from exc
    if TrainingRun._meta.db_table not in tables:
        raise TrainingError("The database has no training-run table yet; run `python manage.py migrate` first.")


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train as ``config`` says; the ``TrainingRun`` row follows it from running to succeeded or failed."""
    conversations, dataset_format = load_conversations(config.dataset, config.dataset_format, config.max_samples)
    logger.info("%d conversations from %s (%s format)", len(conversations), config.dataset, dataset_format)
    ensure_run_table()
    run = TrainingRun.objects.create(
        config={**config.as_dict(), "dataset_format": dataset_format}, output_dir=config.output_dir
    )
    try:
        result = _train(config, conversations, run, progress)
    except KeyboardInterrupt:
        run.finish(TrainingRun.Status.FAILED, "interrupted")
        raise
    except BaseException as exc:
        run.finish(TrainingRun.Status.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    run.finish(TrainingRun.Status.SUCCEEDED)
    return result


def lora_targets(config: TrainConfig, model) -> str | list[str]:
    """peft's ``target_modules``: every linear layer but the output head for ``all``, else the named ones."""
    if config.lora_target == "all":
        return "all-linear"
    import torch

    linear = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    )
    missing = [name for name in config.lora_target if name not in linear]
    if missing:
        raise TrainingError(
            f"lora_target: the model has no {', '.join(missing)}; its linear layers: {', '.join(linear)}"
        )
    return list(config.lora_target)


def _train(config: TrainConfig, conversations: list[Conversation], run: TrainingRun, progress: bool) -> TrainResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from tripod.conf import config as tripod_config
    from tripod.engines.tiny import resolve_model_path
    from tripod.training.formatting import PaddingCollator, build_examples

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_NAME).write_text(yaml.safe_dump(run.config, sort_keys=False))
    set_seed(config.seed)

    path = resolve_model_path(config.model_name_or_path, tripod_config().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = build_examples(tokenizer, conversations, config.cutoff_len)
    if examples.truncated or examples.dropped:
        logger.warning(
            "%d examples cut at cutoff_len=%d, %d dropped (no assistant token left); longest: %d tokens",
            examples.truncated,
            config.cutoff_len,
            examples.dropped,
            examples.longest,
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise TrainingError("The tokenizer has neither a pad token nor an EOS token to pad batches with.")

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    adapter = config.finetuning_type == "lora"
    if adapter:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.effective_lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_targets(config, model),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("%d examples; %s parameters trainable of %s", len(examples.rows), f"{trainable:,}", f"{total:,}")

    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the steps in transformers 5
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        # Without an accelerator say so, or transformers refuses bf16 (CPU autocast) instead of using it.
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
    )

    def on_loss(step: int, max_steps: int, loss: float) -> None:
        run.progress(step, max_steps, loss)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples.rows,
        data_collator=PaddingCollator(pad_id),
        processing_class=tokenizer,
        callbacks=[LossLog(output_dir, on_loss)],
    )
    outcome = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    keep_adapter = adapter and not config.merge_lora
    _save(trainer, tokenizer, output_dir, adapter=adapter, merge=adapter and config.merge_lora)
    if keep_adapter:
        _name_base_model(output_dir, config.model_name_or_path)
    trainer.save_metrics("train", {**outcome.metrics, "examples": len(examples.rows)})
    plot_losses(output_dir)
    run.progress(trainer.state.global_step, trainer.state.max_steps, run.final_loss)
    logger.info("trained %d steps; final loss %s; model in %s", trainer.state.global_step, run.final_loss, output_dir)
    return TrainResult(run.pk, output_dir, keep_adapter, trainer.state.global_step, run.final_loss, len(examples.rows))


def _save(trainer, tokenizer, output_dir: Path, *, adapter: bool, merge: bool) -> None:
    """Write the final model (or adapter) at the top of ``output_dir``, removing the other kind's files."""
    stale = FULL_MODEL_FILES if adapter and not merge else ADAPTER_FILES
    for name in stale:
        (output_dir / name).unlink(missing_ok=True)
    if merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    else:
        trainer.save_model(str(output_dir))


def _name_base_model(output_dir: Path, model_name_or_path: str) -> None:
    """Make the adapter name its base as the user did (``tiny``, a hub id), not as a cache path."""
    path = output_dir / "adapter_config.json"
    adapter_config = json.loads(path.read_text())
    adapter_config["base_model_name_or_path"] = model_name_or_path
    path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
