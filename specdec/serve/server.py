"""Serve an app on a free loopback port in a background thread (tests, benchmarks, notebooks).

    with running_server(create_app(cfg)) as base_url:   # "http://127.0.0.1:54321"
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x")
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0,
                   log_level: str = "warning") -> Iterator[str]:
    """Yield the base URL of `app` served by uvicorn in a thread; shut it down on exit.

    The socket is bound here (port 0: the OS picks a free port), so there is no race between
    choosing a port and binding it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread exited during startup (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {startup_timeout:.0f} s")
            time.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
