"""The pool at /v1 in front of a Django ASGI application, which has no lifespan of its own.

    LIP_BACKENDS=http://127.0.0.1:8080 uvicorn examples.django_app:application

PoolMiddleware answers the ASGI lifespan itself (starting and stopping the pool), sends /v1/... to
the pool and everything else to Django.
"""

import django
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
)
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402 - needs the settings above

from local_inference_pool import PoolMiddleware, load_config  # noqa: E402


def hello(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"hello": "from django"})


urlpatterns = [path("hello", hello)]

application = PoolMiddleware(get_asgi_application(), load_config(), path="/v1")
