"""The training app's configuration.

The training leg is a Django app of its own, ``training``, so that its table, migrations and admin section stay apart
from the serving side's.
"""

from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "tripod.training"
    label = "training"
    verbose_name = "Training runs"
