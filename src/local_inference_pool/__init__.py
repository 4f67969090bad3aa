"""local-inference-pool: one slot-aware endpoint in front of many local LLM servers.

The public API is exactly ``__all__``; everything else is internal.
"""

from local_inference_pool.compat import (
    ConcurrentDispatcher,
    DispatcherTimeoutError,
    InferenceTask,
    ModelNotAvailableError,
    NoModelsAvailableError,
    ServerConfig,
    ServerPool,
)
from local_inference_pool.config import BackendConfig, PoolConfig, load_config
from local_inference_pool.core.prompt_index import Prompt, prompt_of
from local_inference_pool.core.scheduler import Affinity, Health
from local_inference_pool.errors import (
    ConfigError,
    ModelNotFoundError,
    NoCapacityError,
    PoolClosedError,
    PoolError,
    QueueFullError,
    QueueTimeoutError,
    WrongEventLoopError,
)
from local_inference_pool.gateway.app import (
    PoolMiddleware,
    create_pool_app,
    create_standalone_app,
    pool_lifespan,
)
from local_inference_pool.library import Pool
from local_inference_pool.pool.leases import Lease

__all__ = [
    "Affinity",
    "BackendConfig",
    "ConcurrentDispatcher",
    "ConfigError",
    "DispatcherTimeoutError",
    "Health",
    "InferenceTask",
    "Lease",
    "ModelNotAvailableError",
    "ModelNotFoundError",
    "NoCapacityError",
    "NoModelsAvailableError",
    "Pool",
    "PoolClosedError",
    "PoolConfig",
    "PoolError",
    "PoolMiddleware",
    "Prompt",
    "QueueFullError",
    "QueueTimeoutError",
    "ServerConfig",
    "ServerPool",
    "WrongEventLoopError",
    "create_pool_app",
    "create_standalone_app",
    "load_config",
    "pool_lifespan",
    "prompt_of",
]
