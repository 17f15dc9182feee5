"""An HTTP proxy in front of a real S3 endpoint (the tests' moto server) that injects the
faults a real S3 shows: throttling answers, error answers, connections cut before or after
the request reached S3, and whole outages. Code under test points AWS_ENDPOINT_URL at
`S3Proxy.endpoint` and talks plain S3; nothing in it is mocked.

`S3Proxy.fault` decides per request (a `Request`) what happens to it: None forwards it,
an `Answer` answers in S3's place without forwarding, `CUT` closes the connection unanswered,
`LOSE_ANSWER` forwards it and then closes the connection before S3's answer reaches the
client. `S3Proxy.down` cuts every connection, whatever `fault` says.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Headers of one connection, not of the message; the length is set anew for each hop.
_NOT_FORWARDED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-connection", "content-length"}
)  # fmt: skip


@dataclass(frozen=True)
class Request:
    method: str
    key: str  # the path without its leading "/": bucket/key with path-style addressing
    query: str

    @property
    def write(self) -> bool:
        return self.method in ("PUT", "POST")


@dataclass(frozen=True)
class Answer:
    """An S3 error answer: `status` and an XML body with `code`. A 200 with an error code
    is what S3 may answer to CompleteMultipartUpload."""

    status: int
    code: str

    def body(self) -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>injected by the test proxy</Message>"
            "<RequestId>0</RequestId></Error>"
        ).encode()


CUT = "cut"
LOSE_ANSWER = "lose-answer"
SLOW_DOWN = Answer(503, "SlowDown")

Fault = Callable[[Request], "Answer | str | None"]


class S3Proxy:
    """The proxy, listening on a free local port from `start()` to `stop()`. `counts`
    says what it did: forwarded, answered (per code), cut, lost-answer."""

    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self._upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.fault: Fault | None = None
        self.down = False
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.verify_request = self._accept  # type: ignore[method-assign]
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> S3Proxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _accept(self, _request, _address) -> bool:
        # A new connection during an outage is closed at once, like a dead endpoint's.
        if self.down:
            self.count("cut")
            return False
        return True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects of S3

            def log_message(self, *_args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = bytearray()
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(data)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                path, _, query = self.path.partition("?")
                request = Request(self.command, path.lstrip("/"), query)
                action = CUT if proxy.down else (proxy.fault(request) if proxy.fault else None)
                if action == CUT:
                    proxy.count("cut")
                    self.close_connection = True
                    return
                if isinstance(action, Answer):
                    proxy.count(f"answered {action.code}")
                    payload = action.body()
                    self.send_response(action.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                status, reason, headers, payload = self._forward(body)
                if action == LOSE_ANSWER:
                    proxy.count("lost-answer")
                    self.close_connection = True
                    return
                proxy.count("forwarded")
                self.send_response(status, reason)
                for name, value in headers:
                    if name.lower() not in _NOT_FORWARDED:
                        self.send_header(name, value)
                length = next((v for n, v in headers if n.lower() == "content-length"), None)
                head = self.command == "HEAD"
                self.send_header("Content-Length", length if head and length else str(len(payload)))
                self.end_headers()
                if not head:
                    self.wfile.write(payload)

            def _forward(self, body: bytes):
                upstream = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                try:
                    # The client's Host header goes along: its signature covers it.
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED
                    }
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = b"" if self.command == "HEAD" else response.read()
                    return response.status, response.reason, response.getheaders(), payload
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler
