"""The pool layer: leases over the scheduler, and coordination with the rest of the fleet."""

from local_inference_pool.pool.leases import Acquiring, Lease, Unleased
from local_inference_pool.pool.pool import Pool

__all__ = ["Acquiring", "Lease", "Pool", "Unleased"]
