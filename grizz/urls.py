from django.contrib import admin
from django.urls import include, path

from grizz import health

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("api/", include("chat.api_urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("chat.page_urls")),
]
