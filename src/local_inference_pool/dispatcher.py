"""v0.7 import path: ``from local_inference_pool.dispatcher import ConcurrentDispatcher``."""

from local_inference_pool.compat import ConcurrentDispatcher, InferenceTask

__all__ = ["ConcurrentDispatcher", "InferenceTask"]
