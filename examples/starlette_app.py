"""The pool mounted at /v1 inside a Starlette service that has a lifespan of its own.

LIP_BACKENDS=http://127.0.0.1:8080 uvicorn examples.starlette_app:app
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from local_inference_pool import create_pool_app, load_config, pool_lifespan

pool_app = create_pool_app(load_config())


@asynccontextmanager
async def host_lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.started = True  # the host's own start-up work runs after the pool's
    yield


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "from starlette", "started": request.app.state.started})


app = Starlette(
    routes=[Route("/hello", hello), Mount("/v1", pool_app)],
    lifespan=pool_lifespan(pool_app, host_lifespan),
)
