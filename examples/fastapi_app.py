"""The pool mounted at /v1 inside a FastAPI service.

LIP_BACKENDS=http://127.0.0.1:8080 uvicorn examples.fastapi_app:app
"""

from fastapi import FastAPI

from local_inference_pool import create_pool_app, load_config, pool_lifespan

pool_app = create_pool_app(load_config())
# Mounted apps' lifespans are not run by FastAPI/Starlette: pool_lifespan runs the pool's.
app = FastAPI(lifespan=pool_lifespan(pool_app))


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "from fastapi"}


app.mount("/v1", pool_app)
