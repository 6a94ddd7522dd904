"""HTTP routes. WebSocket routes live in the top-level ``routing.py``."""

from django.contrib import admin
from django.urls import path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

from tripod import pages
from tripod.api import docs as apidocs
from tripod.api import views

# The API description is public: it holds no secrets and client authors need it before they have a key.
PUBLIC = {"authentication_classes": [], "permission_classes": []}

urlpatterns = [
    path("v1/chat/completions", views.ChatCompletionsView.as_view(), name="chat-completions"),
    # The seed's path: the same view, left out of the OpenAPI document to keep one operation per id.
    path("api/chat/completions", views.ChatCompletionsView.as_view(schema=None), name="chat-completions-seed"),
    path("v1/completions", views.CompletionsView.as_view(), name="completions"),
    path("v1/streams", views.StreamCreateView.as_view(), name="streams"),
    path("v1/streams/<str:stream_id>", views.StreamView.as_view(), name="stream"),
    path("v1/models", views.ModelListView.as_view(), name="models"),
    path("v1/models/<path:model>", views.ModelDetailView.as_view(), name="model-detail"),
    path("v1/usage", views.UsageView.as_view(), name="usage"),
    path("healthz", views.HealthView.as_view(), name="healthz"),
    path("readyz", views.ReadyView.as_view(), name="readyz"),
    path("metrics", views.MetricsView.as_view(), name="metrics"),
    path(
        "v1/openapi.json",
        SpectacularJSONAPIView.as_view(authentication_classes=[], permission_classes=[]),
        name="openapi",
    ),
    path(
        "docs",
        SpectacularSwaggerView.as_view(url_name="openapi", **PUBLIC),
        name="docs",
    ),
    path("docs/ui/<str:name>", apidocs.swagger_ui_file, name="docs-ui"),
    path("admin/", admin.site.urls),
    # The chat page and its assets: plain Django views, outside the API and its OpenAPI document.
    path("", pages.chat_page, name="chat-page"),
    path("ui/<str:name>", pages.ui_asset, name="ui-asset"),
]

handler400 = "tripod.api.errors.bad_request"
handler404 = "tripod.api.errors.not_found"
handler500 = "tripod.api.errors.server_error"
