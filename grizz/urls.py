from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from grizz import health, metrics_views

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics_views.metrics, name="metrics"),
    path("metrics/cluster", metrics_views.metrics_cluster, name="metrics-cluster"),
    # Browsers ask for /favicon.ico whatever the page links to.
    path("favicon.ico", RedirectView.as_view(url=static("chat/favicon.svg"))),
    path("admin/", admin.site.urls),
    path("api/", include("chat.api_urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("chat.page_urls")),
]
