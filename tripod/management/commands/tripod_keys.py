"""``python manage.py tripod_keys create|revoke|list``: manage API keys (stored as hashes).

A new key is printed once, at creation: only its hash is kept, so nothing can show it again.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from tripod.accounts.keys import KEY_PREFIX, generate_key, hash_key, revoke
from tripod.models import APIKey


class Command(BaseCommand):
    help = "Create, revoke and list API keys. A new key is printed once; only its hash is stored."

    def add_arguments(self, parser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="create a key and print it once")
        create.add_argument("name")
        create.add_argument("--rpm", type=int, help="requests per minute")
        create.add_argument("--tpm", type=int, help="prompt + completion tokens per minute")
        create.add_argument("--max-streams", type=int, help="generations running at once")
        drop = sub.add_parser("revoke", help="revoke a key by name or prefix")
        drop.add_argument("name_or_prefix")
        sub.add_parser("list", help="list keys (names, prefixes, limits; never the keys)")

    def handle(self, *args, action: str, **options) -> None:
        getattr(self, f"handle_{action}")(**options)

    def handle_create(self, name: str, rpm: int | None, tpm: int | None, max_streams: int | None, **_) -> None:
        if APIKey.objects.filter(name=name).exists():
            raise CommandError(f"A key named {name!r} already exists.")
        for flag, value in (("--rpm", rpm), ("--tpm", tpm), ("--max-streams", max_streams)):
            if value is not None and value < 1:
                raise CommandError(f"{flag} must be at least 1.")
        key = generate_key()
        APIKey.objects.create(
            name=name,
            prefix=key[: len(KEY_PREFIX) + 6],
            hashed_key=hash_key(key),
            rpm=rpm,
            tpm=tpm,
            max_streams=max_streams,
        )
        self.stdout.write(key)
        self.stderr.write(f"Created key {name!r}. Store it now: it cannot be shown again.")

    def handle_revoke(self, name_or_prefix: str, **_) -> None:
        if not revoke(name_or_prefix):
            raise CommandError(f"No active key named or prefixed {name_or_prefix!r}.")
        self.stdout.write(f"Revoked {name_or_prefix!r}.")

    def handle_list(self, **_) -> None:
        for key in APIKey.objects.order_by("name"):
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            limits = f"rpm={key.rpm or '-'} tpm={key.tpm or '-'} max_streams={key.max_streams or '-'}"
            self.stdout.write(f"{key.name}\t{key.prefix}…\t{limits}\t{state}")
