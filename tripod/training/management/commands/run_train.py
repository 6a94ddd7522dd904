"""``python manage.py run_train --config path.yaml [key=value ...]``: supervised fine-tuning from a YAML config.

Every bad key or value is reported before anything loads, so a typo costs nothing; ``--check`` also reads the dataset
and trains nothing.
"""

from __future__ import annotations

import yaml
from django.core.management.base import BaseCommand, CommandError

from tripod.training.config import load_config
from tripod.training.errors import TrainingError


class Command(BaseCommand):
    help = (
        "Fine-tune a model from a YAML config (LLaMA-Factory key names); key=value arguments override the file. "
        "Every bad key or value is reported before anything loads. See docs/training.md."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--config", help="the YAML config file")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to set or override")
        parser.add_argument(
            "--check", action="store_true", help="validate the config and the dataset, print them, train nothing"
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args, config: str | None, overrides: list[str], check: bool, no_progress: bool, **options):
        try:
            settings = load_config(config, overrides)
            if check:
                from tripod.training.datasets import load_conversations

                conversations, fmt = load_conversations(settings.dataset, settings.dataset_format, settings.max_samples)
                self.stdout.write(yaml.safe_dump(settings.as_dict(), sort_keys=False).rstrip())
                count = f"{len(conversations)} conversation{'' if len(conversations) == 1 else 's'}"
                self.stdout.write(f"# dataset: {count}, {fmt} format. The config is valid.")
                return
            from tripod.training.trainer import train

            result = train(settings, progress=not no_progress)
        except TrainingError as exc:
            raise CommandError(str(exc)) from None
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        self.stdout.write(
            self.style.SUCCESS(
                f"Training run {result.run_id} succeeded: {result.global_step} steps, final loss {loss}, "
                f"{result.examples} examples."
            )
        )
        if result.adapter:
            serve = f"TRIPOD_MODEL={settings.model_name_or_path} TRIPOD_ADAPTER={result.output_dir}"
        else:
            serve = f"TRIPOD_MODEL={result.output_dir}"
        self.stdout.write(f"Serve it: {serve} python manage.py runserver")
