"""``python manage.py tripod_tiny_model --out DIR``: write the built-in tiny model to a directory.

The server builds the same model on first use; written out, it is an ordinary Hugging Face model directory that
``TRIPOD_MODEL=DIR``, training, or any other tool can load.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from tripod.engines.tiny import build_tiny_model


class Command(BaseCommand):
    help = "Build the built-in 'tiny' model (random weights, fixed seed, real tokenizer) into DIR."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--out", required=True, type=Path, help="directory to create (must not exist)")

    def handle(self, *args, out: Path, **options) -> None:
        if out.exists():
            raise CommandError(f"{out} already exists; choose a new directory.")
        build_tiny_model(out)
        self.stdout.write(f"Built the tiny model in {out}; serve it with TRIPOD_MODEL={out}")
