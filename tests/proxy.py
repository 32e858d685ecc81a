"""A TCP proxy in front of PostgreSQL, so that a test can take the database away (every
connection cut, new ones refused) and bring it back, over real connections."""

from __future__ import annotations

import contextlib
import socket
import threading

from sqlalchemy.engine import make_url


class DatabaseProxy:
    """Listens on 127.0.0.1 and forwards to the server of ``url`` (TCP or unix socket)."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        socket_dir = self.url.query.get("host")
        if isinstance(socket_dir, tuple):
            socket_dir = socket_dir[0]
        if socket_dir:  # the embedded server listens on a unix socket only
            port = self.url.port or 5432
            self._target: tuple[int, object] = (socket.AF_UNIX, f"{socket_dir}/.s.PGSQL.{port}")
        else:
            self._target = (socket.AF_INET, (self.url.host or "127.0.0.1", self.url.port or 5432))
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def proxied_url(self) -> str:
        url = self.url.set(host="127.0.0.1", port=self.port)
        url = url.difference_update_query(["host"])
        return url.render_as_string(hide_password=False)

    def start(self) -> DatabaseProxy:
        listener = socket.create_server(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """The database goes away: every connection cut, new ones refused."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            # close() alone does not wake the thread blocked in accept(): it keeps listening.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            family, address = self._target
            server = socket.socket(family, socket.SOCK_STREAM)
            try:
                server.connect(address)  # type: ignore[arg-type]
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
