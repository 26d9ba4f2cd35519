"""Shared fixtures: tiny models, the real gemma-3-270m, a moto S3 server on loopback."""

from __future__ import annotations

import os
import socket
import sys
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

# Prefect's console log handlers bind to whatever sys.stderr is when logging is set up: at
# import, and again whenever a Prefect app is created in-process (e.g. inside a CliRunner,
# whose stream is closed afterwards; later flow logs then fail with "I/O operation on
# closed file"). Point them at a stream that resolves sys.stderr at every write instead.
import prefect
import prefect.logging.configuration
import pytest
from prefect.logging.handlers import PrefectConsoleHandler


class _LiveStderr:
    """Writes to the current ``sys.stderr`` (pytest's capture, or a CliRunner's)."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


_console_init = PrefectConsoleHandler.__init__


def _console_init_on_live_stderr(self, stream=None, *args, **kwargs):
    _console_init(self, _LiveStderr() if stream is None else stream, *args, **kwargs)


PrefectConsoleHandler.__init__ = _console_init_on_live_stderr
prefect.logging.configuration.setup_logging()


TINY_FAMILIES = ("gemma", "llama", "mistral", "qwen", "gpt2", "gpt_neox", "bert")
CAUSAL_FAMILIES = tuple(f for f in TINY_FAMILIES if f != "bert")


@pytest.fixture(scope="session")
def tiny_backend_factory():
    """``factory(family) -> backend`` for tiny random models (cached per family)."""
    from integral_superposition.backends import load_backend

    cache: dict[str, object] = {}

    def make(family: str = "gemma"):
        if family not in cache:
            cache[family] = load_backend(f"tiny:{family}")
        return cache[family]

    return make


@pytest.fixture(scope="session")
def tiny_backend(tiny_backend_factory):
    return tiny_backend_factory("gemma")


@pytest.fixture(scope="session")
def gemma_backend():
    """The real gemma-3-270m from the embedded GGUF package (fp32)."""
    from integral_superposition.backends import HFCausalLM

    return HFCausalLM.from_pretrained("gemma-3-270m")


@pytest.fixture(scope="session")
def demo_df():
    from integral_superposition.data import demo_corpus

    return demo_corpus(400)


@pytest.fixture(scope="session")
def demo_store(tiny_backend, tmp_path_factory):
    """A published dump of 240 demo-corpus titles (8 topics) through tiny:gemma, layer 2."""
    from integral_superposition import DumpConfig
    from integral_superposition.data import demo_corpus
    from integral_superposition.dump import dump_layer_activations

    out = tmp_path_factory.mktemp("demo_store") / "acts"
    return dump_layer_activations(
        demo_corpus(240), "title", "topic", tiny_backend,
        DumpConfig(layer=2, max_len=32, batch_size=64), str(out), progress=False,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields storage options for s3fs."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields ``(s3://bucket URI, storage_options)``."""
    import s3fs

    name = f"isup-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir(name)
    yield f"s3://{name}", dict(s3_server)


@pytest.fixture(scope="session")
def prefect_api():
    """One real Prefect server for the whole session (``prefect_test_harness``, with a
    temporary database); yields its API URL, for subprocesses as ``PREFECT_API_URL``."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield get_current_settings().api.url


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for every browser test of the session (each test opens its own
    page, which resets the page's events and visit)."""
    from integral_superposition.viz.browser import HeadlessChromium, find_chromium

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with HeadlessChromium() as b:
        yield b
