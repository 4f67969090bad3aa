"""v0.7 import path for its three exceptions."""

from local_inference_pool.compat import DispatcherTimeoutError, ModelNotAvailableError, NoModelsAvailableError

__all__ = ["DispatcherTimeoutError", "ModelNotAvailableError", "NoModelsAvailableError"]
