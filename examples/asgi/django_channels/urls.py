"""HTTP URL routes: plain Django views, which wsguard passes through untouched."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


urlpatterns = [path("health/", health)]
