"""Mid-stream failover, the I/O side: a stream whose backend failed, its client still there, is
continued on another backend of the model (``failover`` decides what may be continued and how the
streams join; this module finds the backend, asks it, and relays).

Three ways to continue:
- **a replay**, for greedy decoding or a seeded sampler, when the client got at most
  ``midstream_replay_tokens`` pieces: the client's own request again, through its own route, so the
  second server computes the answer as the first did; the part the client got is checked and not
  sent again (``ReplaySeam``). It is the one way that stays identical where the model's two best
  tokens nearly tie, at one decode step per piece. One that goes another way sent nothing: the
  same backend then goes on another way;
- **by token ids** on llama-server (``llamacpp_tokens``): the conversation rendered and tokenized by
  the server itself, each piece the client got tokenized on its own, then the native ``/completion``
  route goes on from exactly those tokens; its stream is rewritten into the client's by a
  ``NativeSeam``. Nothing is tokenized again as a whole, no template closes the assistant's turn,
  nothing is echoed: the seam is where the first server stopped, at any cut;
- **by text**, on the kinds that continue a trailing assistant message (``backends.continues``), and
  on llama-server when its token routes do not answer: the partial text as a prefill, through the
  client's own route, joined by a ``Seam``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
import httpx
from starlette.types import Send

from local_inference_pool.errors import PoolError
from local_inference_pool.gateway.client_watch import ClientWatch
from local_inference_pool.gateway.failover import (
    API,
    Partial,
    Recorder,
    Seam,
    StreamSeam,
    continuation,
    read_partial,
)
from local_inference_pool.gateway.inbound import Inbound
from local_inference_pool.gateway.leasing import acquire_unless_gone
from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.gateway.native_seam import NativeSeam
from local_inference_pool.gateway.refusals import client_gone
from local_inference_pool.gateway.relay import (
    UpstreamRelay,
    continue_stream,
    end_stream,
    raw_chunks,
)
from local_inference_pool.gateway.replay_seam import ReplaySeam
from local_inference_pool.gateway.runtime import Call, Runtime, Target, upstream_request
from local_inference_pool.upstream.backends import continues, continues_by_tokens
from local_inference_pool.upstream.backends import llamacpp_tokens as tokens
from local_inference_pool.upstream.backends.openai import describe_http_error

__all__ = ["fail_over"]

logger = logging.getLogger(__name__)

PREPARE_SECONDS: Final = 10.0  # for the template and tokenize requests together, which take no slot
PREPARE_ANSWER: Final = 16 << 20  # bytes of their answers read at most
CLOSE_SECONDS: Final = 2.0  # closing an answer not used, shielded


@dataclass(frozen=True)
class Way:
    """How one backend continues a stream: the path, the body, and the seam that joins the streams."""

    path: str
    body: bytes
    seam: StreamSeam
    by_tokens: bool
    replays: bool = False  # regenerates what the client got, checks it, then goes on


async def fail_over(
    watch: ClientWatch,
    send: Send,
    runtime: Runtime,
    call: Call,
    inbound: Inbound,
    record: RequestRecord,
    relay: UpstreamRelay,
    recorder: Recorder,
) -> None:
    """A stream whose backend failed midway, the client still there: continue it on another backend
    of the model (pinned there, ahead of its queue: this request already waited), at most
    ``midstream_failovers`` times, or end it with the route's error event saying why not."""
    pool, route, model = runtime.pool, call.route.path, inbound.model
    failed = [relay.lease.backend]
    broken, failed_at = relay.lease.backend, relay.failed_at  # the last backend that failed midway
    message = f"the backend {relay.lease.backend} failed during the response: {relay.interrupted}"
    outcome = "budget_spent"
    attempts = 0
    replay = True  # until a replay went another way: then from the tokens, on the same backend
    again: str | None = None  # the backend to ask again, after its replay went another way
    while attempts < runtime.config.midstream_failovers:
        partial = read_partial(bytes(recorder.buffer), route)
        if partial.finished:  # it failed after its end marker: nothing is missing
            await end_stream(send, None, record, runtime, "ok")
            return
        if partial.refusal is not None:
            outcome = "not_faithful"
            logger.info("not continuing a stream of %r: %s", model, partial.refusal)
            break
        target_name = again or _continuable_backend(runtime, model, failed, route)
        if target_name is None:
            outcome = "no_backend"
            break
        try:
            target = await acquire_unless_gone(watch, pool, inbound, target_name)
        except PoolError:
            outcome = "no_backend"
            break
        if target is None:
            client_gone(record, runtime)
            return
        replays = replay and _replays(inbound.payload, partial, runtime.config.midstream_replay_tokens)
        asked = await _ask_to_continue(
            watch, runtime, call, target, record, inbound.payload, partial, replays
        )
        if asked is None:
            if watch.gone:
                client_gone(record, runtime)
                return
            failed.append(target.backend)
            attempts, again, outcome = attempts + 1, None, "failed"
            continue
        way, response = asked
        how = "a replay" if way.replays else "token ids" if way.by_tokens else "text"
        logger.info("continuing a stream of %r on %s by %s", model, target.backend, how)
        record.failed_over_from.append(broken)  # before the relay reports the request
        record.backend = target.backend
        relay = await continue_stream(
            watch, send, runtime, response, target, record, call, recorder, way.seam
        )
        if relay.diverged:  # nothing of it was sent: the same backend goes on from the tokens
            logger.info("the replay on %s went another way (%s)", target.backend, relay.interrupted)
            record.failed_over_from.pop()
            replay, again = False, target.backend
            continue
        attempts, again = attempts + 1, None
        gap = None if relay.first_sent_at is None or failed_at is None else relay.first_sent_at - failed_at
        runtime.metrics.failover(model, "continued", gap)
        if relay.interrupted is None:
            return  # the continuation ran to its end (and reported the request)
        failed.append(relay.lease.backend)
        broken, failed_at = relay.lease.backend, relay.failed_at
        message = f"the backend {relay.lease.backend} failed during the response: {relay.interrupted}"
        outcome = "budget_spent"
    runtime.metrics.failover(model, outcome)
    await end_stream(
        send, call.dialect.stream_error(message, "upstream_failed"), record, runtime, "failed_midway"
    )


def _continuable_backend(runtime: Runtime, model: str, failed: list[str], route: str) -> str | None:
    """Another healthy backend of the model whose kind can continue the answer one way or the other."""
    pool = runtime.pool
    avoid = list(failed)
    while (name := pool.another_backend(model, avoid)) is not None:
        kind = pool.backends.kind(name)
        if continues_by_tokens(kind) or continues(kind, API[route]) is not None:
            return name
        avoid.append(name)
    return None


async def _ask_to_continue(
    watch: ClientWatch,
    runtime: Runtime,
    call: Call,
    target: Target,
    record: RequestRecord,
    payload: Mapping[str, Any],
    partial: Partial,
    replays: bool,
) -> tuple[Way, httpx.Response] | None:
    """Ask ``target`` to continue ``partial``: by a replay of the client's own request when
    ``replays``; else by token ids where its kind can, and by text where its kind can if that gave
    no stream (a server whose token routes are off or missing). Its streamed answer and the way it
    continues, or None (the slot given back) when none gave one."""
    route = call.route.path
    kind = runtime.pool.backends.kind(target.backend)
    try:
        if replays:
            again = json.dumps(payload).encode()  # the client's own request
            replay = Way(call.path, again, ReplaySeam(partial, route), by_tokens=False, replays=True)
            response, reached = await _send(watch, runtime, call, target, record, replay)
            if response is not None:
                return replay, response
            if not reached:
                target.release()
                return None
        if continues_by_tokens(kind):
            way = await _by_tokens(watch, runtime, call, target, record, payload, partial)
            if way is not None:
                response, reached = await _send(watch, runtime, call, target, record, way)
                if response is not None:
                    return way, response
                if not reached:
                    target.release()
                    return None
            logger.info("backend %s did not continue a stream by token ids: trying by text", target.backend)
        body = continuation(payload, partial, route, continues(kind, API[route]))
        if body is not None and not watch.gone:
            way = Way(call.path, body, Seam(partial, route), by_tokens=False)
            response, _reached = await _send(watch, runtime, call, target, record, way)
            if response is not None:
                return way, response
    except BaseException:
        target.release()
        raise
    target.release()
    return None


async def _by_tokens(
    watch: ClientWatch,
    runtime: Runtime,
    call: Call,
    target: Target,
    record: RequestRecord,
    payload: Mapping[str, Any],
    partial: Partial,
) -> Way | None:
    """The prompt's tokens as the server's own route would make them, then the pieces' tokens one by
    one, and the native request that goes on from both; None if the server did not answer so."""
    route = call.route.path
    model = payload.get("model")
    ask = functools.partial(_ask, watch, runtime, call, target, record)
    with anyio.move_on_after(PREPARE_SECONDS):
        if route == "/completions":
            prompt: str | None = str(payload.get("prompt", ""))
        else:
            template = tokens.template_body(payload, API[route])
            if template is None:
                return None
            prompt = tokens.read_prompt(await ask(tokens.TEMPLATE_PATH, template))
        if prompt is None:
            return None
        asked = tokens.tokenize_body(prompt, model=model, with_bos=True)
        first = tokens.read_tokens(await ask(tokens.TOKENIZE_PATH, asked))
        pieces: list[int] | None = []
        if partial.texts:
            asked = tokens.tokenize_body(partial.texts, model=model, with_bos=False)
            pieces = tokens.read_tokens(await ask(tokens.TOKENIZE_PATH, asked))
        if first is None or pieces is None:
            return None
        body = tokens.completion_body(payload, first + pieces, _left(payload, partial.pieces))
        seam = NativeSeam(partial, route, payload, prompt_tokens=len(first))
        return Way(tokens.COMPLETION_PATH, json.dumps(body).encode(), seam, by_tokens=True)
    return None  # the server took too long to render or tokenize


def _left(payload: Mapping[str, Any], sent: int) -> int | None:
    """The client's token budget less the pieces it got (llama-server streams a token a piece)."""
    for budget in ("max_completion_tokens", "max_tokens", "n_predict"):
        given = payload.get(budget)
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return max(1, given - sent)
    return None


def _replays(payload: Mapping[str, Any], partial: Partial, limit: int) -> bool:
    """Whether to regenerate what the client got rather than go on from its tokens: only where the
    server would generate it again, token for token (greedy decoding, or a seed), and only for up to
    ``limit`` tokens (each costs one decode step at the seam); always when the client got no text."""
    if limit <= 0 or partial.pieces > limit:
        return False
    if not partial.texts:
        return True  # nothing to check: the request again is exactly the answer, whatever its sampling
    temperature, top_k, seed = payload.get("temperature"), payload.get("top_k"), payload.get("seed")
    greedy = (isinstance(temperature, int | float) and temperature <= 0) or top_k == 1
    seeded = isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 0xFFFFFFFF
    return greedy or seeded


async def _ask(
    watch: ClientWatch,
    runtime: Runtime,
    call: Call,
    target: Target,
    record: RequestRecord,
    path: str,
    body: Mapping[str, Any],
) -> Any:
    """A JSON request to the target that takes no slot, and its JSON answer (None on any failure, a
    status other than 200, or an answer over ``PREPARE_ANSWER`` bytes)."""
    asked = dataclasses.replace(call, path=path, content_type=b"application/json")
    request = upstream_request(runtime, asked, target, record, json.dumps(body).encode(), attempt=False)
    response: httpx.Response | None = None
    try:
        async with watch.until_gone():
            response = await runtime.transport.handle_async_request(request)
        if response is None or response.status_code != 200:
            return None
        data = bytearray()
        async for chunk in raw_chunks(response):
            data += chunk
            if len(data) > PREPARE_ANSWER:
                return None
        return json.loads(data)
    except (httpx.HTTPError, ValueError) as exc:
        logger.info("backend %s: %s %s failed: %s", target.backend, call.method, path, exc)
        return None
    finally:
        if response is not None:
            with anyio.move_on_after(CLOSE_SECONDS, shield=True):
                await response.aclose()


async def _send(
    watch: ClientWatch, runtime: Runtime, call: Call, target: Target, record: RequestRecord, way: Way
) -> tuple[httpx.Response | None, bool]:
    """The continuation's streamed answer, or None (the slot kept) if it gave none; and whether the
    backend was reached at all."""
    asked = dataclasses.replace(call, path=way.path)
    request = upstream_request(runtime, asked, target, record, way.body)
    response: httpx.Response | None = None
    try:
        async with watch.until_gone():
            response = await runtime.transport.handle_async_request(request)
    except httpx.HTTPError as exc:
        runtime.monitor.failed(target.backend, f"continuation: {describe_http_error(exc)}")
        return None, False
    if response is None:
        return None, False  # the client left
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith(
        "text/event-stream"
    ):
        logger.info("backend %s answered %s to a continuation", target.backend, response.status_code)
        with anyio.move_on_after(CLOSE_SECONDS, shield=True):
            await response.aclose()
        return None, True
    return response, True
