"""HTTP routes. WebSocket routes live in the top-level ``routing.py``."""

from django.contrib import admin
from django.urls import path

from tripod.api import views

urlpatterns = [
    path("v1/chat/completions", views.ChatCompletionsView.as_view(), name="chat-completions"),
    path("api/chat/completions", views.ChatCompletionsView.as_view(), name="chat-completions-seed"),
    path("v1/completions", views.CompletionsView.as_view(), name="completions"),
    path("v1/models", views.ModelListView.as_view(), name="models"),
    path("v1/models/<path:model>", views.ModelDetailView.as_view(), name="model-detail"),
    path("v1/usage", views.UsageView.as_view(), name="usage"),
    path("healthz", views.HealthView.as_view(), name="healthz"),
    path("readyz", views.ReadyView.as_view(), name="readyz"),
    path("admin/", admin.site.urls),
]

handler400 = "tripod.errors.bad_request"
handler404 = "tripod.errors.not_found"
handler500 = "tripod.errors.server_error"
