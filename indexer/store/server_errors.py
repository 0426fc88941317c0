"""How the server backend reports qdrant-client's errors: one line each, and "that collection does
not exist" told apart (Missing), so a read of a collection not built yet answers empty with one
call instead of asking `collection_exists` first.

qdrant-client says "not found" three ways: REST 404 "doesn't exist", gRPC NOT_FOUND, and its
local mode (the in-process double the contract tests inject, never a user-facing backend) a
ValueError "Collection NAME not found".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from phisearch.indexer.store.base import StoreError
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse


class Missing(StoreError):
    """The collection does not exist (yet)."""


def is_connection_error(e: BaseException) -> bool:
    """Errors worth a retry: the server was unreachable, not a refused request."""
    if isinstance(e, (ResponseHandlingException, ConnectionError, TimeoutError)):
        return True
    try:
        import grpc
    except ImportError:
        return False
    return isinstance(e, grpc.RpcError) and e.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def is_not_found(e: BaseException) -> bool:
    """gRPC's or local mode's answer for a collection that does not exist (REST: see errors())."""
    if isinstance(e, ValueError):
        text = str(e)
        return text.startswith("Collection ") and text.endswith(" not found")
    try:
        import grpc
    except ImportError:
        return False
    return isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.NOT_FOUND


def short(e: BaseException) -> str:
    """One line: gRPC errors carry theirs in details(), others in their first line."""
    details = getattr(e, "details", None)
    text = details() if callable(details) else str(e)
    return (text or type(e).__name__).splitlines()[0]


@contextmanager
def errors(url: str | None, where: str, what: str) -> Iterator[None]:
    """Client exceptions -> one-line StoreErrors (Missing for a collection that does not exist)."""
    try:
        yield
    except StoreError:
        raise
    except UnexpectedResponse as e:
        if e.status_code == 404 and b"doesn't exist" in (e.content or b""):
            raise Missing(str(e)) from None
        hint = " (check --api-key / QDRANT_API_KEY)" if e.status_code in (401, 403) else ""
        body = e.content.decode(errors="replace") if e.content else ""
        if body.lstrip().startswith("<") or "html" in body[:200].lower():
            raise StoreError(f"{url} answered {what} with an HTML page (HTTP "
                             f"{e.status_code} {e.reason_phrase}): not a Qdrant server? "
                             "check --qdrant-url") from None
        detail = " ".join(body.split())[:200] if body else e.reason_phrase
        raise StoreError(f"Qdrant at {url} refused {what}: HTTP {e.status_code} "
                         f"{detail}{hint}") from None
    except Exception as e:
        if is_not_found(e):
            raise Missing(str(e)) from None
        if is_connection_error(e):
            raise StoreError(f"cannot reach Qdrant at {url}: {short(e)}") from None
        raise StoreError(f"{what} on {where} failed: {e}") from e
