"""A slot for a request, given up if its client leaves while it waits."""

from __future__ import annotations

from local_inference_pool.core.model import LeaseRequest
from local_inference_pool.gateway.client_watch import ClientWatch
from local_inference_pool.gateway.inbound import Inbound
from local_inference_pool.pool import Lease, Pool

__all__ = ["acquire_unless_gone"]


async def acquire_unless_gone(
    watch: ClientWatch, pool: Pool, inbound: Inbound, pin: str | None
) -> Lease | None:
    """A slot for the request, or None if the client leaves while it queues (freeing its place)."""
    acquiring = pool.acquire(
        LeaseRequest(
            inbound.model,
            priority=inbound.priority,
            session=inbound.session,
            timeout=pool.config.queue_timeout,
            pin=pin,
            tenant=inbound.tenant,
            prompt=inbound.prompt,
        )
    )
    lease = acquiring.at_once()
    if lease is not None:
        return lease  # the common case: a slot was free, nothing to wait for
    async with watch.until_gone():
        # Waits if needed, and with shared state claims the slot fleet-wide; cancelled, it passes
        # on any grant that raced the cancel and gives back any claim.
        return await acquiring
    return None  # the client left
