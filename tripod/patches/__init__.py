"""Changes to other libraries' internals, each load-bearing for speed or robustness.

Every module here declares ``WRITTEN_AGAINST``, the requirement specifiers of the libraries whose internals it
reaches, and ``tests/test_patch_pins.py`` fails when a pin moves, so an upgrade re-reads the patch first.
``docs/architecture.md`` says what each one patches and why. This package imports nothing of Django at its top, so
engines may use it in a process without Django settings.
"""
