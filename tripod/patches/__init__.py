"""Changes to other libraries' internals, each load-bearing for speed or robustness.

Every module here declares ``WRITTEN_AGAINST``, the requirement specifiers (as ``requirements.txt`` pins them) of
the libraries whose internals it reaches; ``tests/test_patch_pins.py`` fails when a pin moves, so an upgrade
re-reads the patch first. ``docs/architecture.md`` lists what each one patches. This package imports nothing of
Django at its top, so engines may use it in a process without Django settings.
"""
