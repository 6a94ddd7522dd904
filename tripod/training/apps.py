from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "tripod.training"
    label = "training"
    verbose_name = "Training runs"
