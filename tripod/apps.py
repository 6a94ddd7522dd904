from django.apps import AppConfig


class TripodConfig(AppConfig):
    name = "tripod"
    verbose_name = "AI Tripod"
