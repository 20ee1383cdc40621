import socket

import pytest


@pytest.fixture(scope="session")
def serve_port(ray_cluster, tmp_path_factory):
    """Serve on a free loopback port for the session; the demo model cached under a temp dir."""
    import os

    from ray import serve

    os.environ["RAYSPEED_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
