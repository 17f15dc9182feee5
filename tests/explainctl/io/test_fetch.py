"""http(s) fetching against a real local server, with every outbound connection watched.

The server listens on 127.0.0.1, so fetches that must succeed use allow_private=True;
each such URL also has a test showing it is blocked without it. Hosts other than
loopback only ever reach fake resolvers, and the `connections` spy (autouse) refuses any
connection to a non-loopback address without touching the network.
"""

from __future__ import annotations

import datetime
import itertools
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from explainctl.io import fetch
from explainctl.io.fetch import HttpPolicy, fetch_http
from explainctl.spec.errors import InvalidInput, ItemError

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
SECRET = "s3cr3t-t0ken"
LIMIT = 1 << 20

ON = HttpPolicy(enabled=True)
LOCAL = HttpPolicy(enabled=True, allow_private=True, timeout=2.0)


# --------------------------------------------------------------------------- server


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    release = threading.Event()  # lets /slow finish as soon as the test is done with it

    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _redirect(self, location, status=302):
        self._send(status, headers=[("Location", location)])

    def _stream(self, size, chunked):
        self.send_response(200)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        data = b"x" * size
        try:
            for start in range(0, size, 4096):
                piece = data[start : start + 4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading at its limit, as it should

    def _drip(self, headers: bool) -> None:
        """A byte every 0.1 s, each well within a read's timeout, for as long as the client
        listens: in the status line and headers, or in a close-delimited body."""
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
        if not headers:
            self.wfile.write(head)
            head = b""
        try:
            for byte in itertools.chain(head, itertools.repeat(0x89)):
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if self.release.wait(0.1):
                    return
        except OSError:
            pass  # the client cut it off
        self.close_connection = True

    def do_GET(self):
        parts = urlsplit(self.path)
        path, here = parts.path, f"http://{self.headers['Host']}"
        segments = path.strip("/").split("/")
        if path == "/image.png":
            self._send(200, IMAGE, [("Content-Type", "image/png")])
        elif path == "/echo":
            seen = {"host": self.headers["Host"], "path": self.path}
            self._send(200, json.dumps(seen).encode())
        elif path in ("/missing", "/gone", "/forbidden", "/unauthorized", "/broken"):
            codes = {"/missing": 404, "/gone": 410, "/forbidden": 403, "/unauthorized": 401}
            self._send(codes.get(path, 500), b"nope")
        elif segments[0] == "redirect":
            self._redirect(f"{here}/image.png", int(segments[1]))
        elif path == "/relative-redirect":
            self._redirect("/image.png")
        elif segments[0] == "chain":
            hops = int(segments[1])
            self._redirect(f"/chain/{hops - 1}" if hops else "/image.png")
        elif path == "/to-metadata":
            self._redirect(f"http://169.254.169.254/latest/meta-data/?token={SECRET}")
        elif path == "/to-ftp":
            self._redirect("ftp://127.0.0.1/image.png")
        elif path == "/to-userinfo":
            self._redirect(f"http://user:{SECRET}@{self.headers['Host']}/image.png")
        elif path == "/to-private-name":
            self._redirect("http://intranet.test/admin")
        elif path == "/no-location":
            self._send(302)
        elif path == "/huge-header":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
        elif segments[0] in ("close", "chunked"):
            self._stream(int(segments[1]), chunked=segments[0] == "chunked")
        elif path == "/slow":
            self.release.wait(5)
            self._send(200, IMAGE)
        elif path in ("/drip", "/drip-headers"):
            self._drip(path == "/drip-headers")
        else:
            self._send(404)


def _serve(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        Handler.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    Handler.release.clear()
    yield from _serve(ThreadingHTTPServer(("127.0.0.1", 0), Handler))


@pytest.fixture
def base(port: int) -> str:
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- network spies


class Connections(list):
    """Every (address, port) the fetcher tried to connect to."""


@pytest.fixture(autouse=True)
def connections(monkeypatch: pytest.MonkeyPatch) -> Connections:
    calls = Connections()
    real = socket.create_connection

    def spy(address, *args, **kwargs):
        calls.append((address[0], address[1]))
        if address[0] not in ("127.0.0.1", "::1"):
            raise ConnectionRefusedError("test spy: non-loopback connection refused")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return calls


def fake_resolver(mapping: dict[str, list[str]]):
    """A getaddrinfo stand-in that never leaves the process; unknown names do not resolve."""
    calls: list[str] = []

    def resolve(host, port, *args, **kwargs):
        calls.append(host)
        if host not in mapping:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        infos = []
        for ip in mapping[host]:
            if ":" in ip:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
        return infos

    resolve.calls = calls
    return resolve


def numeric_only(host, port, *args, **kwargs):
    """The real getaddrinfo, but only for numeric forms, so no test can cause a DNS query."""
    kwargs["flags"] = kwargs.get("flags", 0) | socket.AI_NUMERICHOST
    return socket.getaddrinfo(host, port, *args, **kwargs)


def fails(code: str, url: str, policy: HttpPolicy = ON, **kwargs) -> str:
    kwargs.setdefault("max_bytes", LIMIT)
    with pytest.raises(ItemError) as caught:
        fetch_http(url, policy=policy, **kwargs)
    assert caught.value.code == code, caught.value.message
    message = caught.value.message
    assert "\n" not in message and SECRET not in message
    return message


# --------------------------------------------------------------------------- success


def test_fetches_image_from_allowed_local_server(base, connections):
    assert fetch_http(f"{base}/image.png", max_bytes=LIMIT, policy=LOCAL) == IMAGE
    assert connections == [("127.0.0.1", int(base.rsplit(":", 1)[1]))]


def test_same_url_is_blocked_without_allow_private(base, connections):
    message = fails("blocked-address", f"{base}/image.png")
    assert "non-public" in message
    assert connections == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_follows_redirects(base, status):
    assert fetch_http(f"{base}/redirect/{status}", max_bytes=LIMIT, policy=LOCAL) == IMAGE


def test_follows_relative_redirect(base):
    assert fetch_http(f"{base}/relative-redirect", max_bytes=LIMIT, policy=LOCAL) == IMAGE


def test_redirect_chain_up_to_the_limit(base):
    policy = HttpPolicy(enabled=True, allow_private=True, max_redirects=3)
    # /chain/N takes N + 1 redirects to reach the image.
    assert fetch_http(f"{base}/chain/2", max_bytes=LIMIT, policy=policy) == IMAGE
    message = fails("too-many-redirects", f"{base}/chain/3", policy)
    assert "/chain/0" in message and "more than 3 redirects" in message


def test_zero_redirects_allowed_refuses_the_first(base):
    policy = HttpPolicy(enabled=True, allow_private=True, max_redirects=0)
    fails("too-many-redirects", f"{base}/redirect/302", policy)


def test_connects_to_the_checked_address_but_sends_the_original_host(port, connections):
    resolver = fake_resolver({"images.test": ["127.0.0.1"]})
    body = fetch_http(
        f"http://Images.TEST:{port}/echo?x=1", max_bytes=LIMIT, policy=LOCAL, resolver=resolver
    )
    assert json.loads(body) == {"host": f"images.test:{port}", "path": "/echo?x=1"}
    assert resolver.calls == ["images.test"]  # resolved once, never again by the socket layer
    assert connections == [("127.0.0.1", port)]


def test_public_address_is_accepted_and_pinned(connections):
    # The spy refuses the connection, so nothing leaves the machine; what matters is that
    # the fetcher got as far as connecting, to the resolved address itself.
    resolver = fake_resolver({"cdn.example": ["93.184.216.34"]})
    message = fails("fetch-error", f"http://cdn.example/a.png?sig={SECRET}", resolver=resolver)
    assert "http://cdn.example/a.png" in message
    assert connections == [("93.184.216.34", 80)]


def test_request_target_is_percent_encoded(base):
    body = fetch_http(f"{base}/echo?q=a b\u00e9", max_bytes=LIMIT, policy=LOCAL)
    assert json.loads(body)["path"] == "/echo?q=a%20b%C3%A9"


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://[::1]:80/",
        "http://2130706433/",  # decimal 127.0.0.1
        "http://0x7f000001/",  # hex 127.0.0.1
        "http://127.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0:8080/",
        "http://10.1.2.3/",
        "http://localhost./",
    ],
)
def test_non_public_literal_hosts_are_blocked_before_connecting(url, connections):
    resolver = fake_resolver({"localhost": ["127.0.0.1", "::1"]})

    def resolve(host, *args, **kwargs):
        # Numeric spellings go to the real getaddrinfo, names to the fake.
        return (resolver if host == "localhost" else numeric_only)(host, *args, **kwargs)

    fails("blocked-address", url, resolver=resolve)
    assert connections == []


def test_default_resolver_blocks_decimal_loopback(connections):
    # No resolver argument: the real socket.getaddrinfo turns "2130706433" into
    # 127.0.0.1 locally (inet_aton), without a DNS query.
    fails("blocked-address", "http://2130706433/")
    assert connections == []


BLOCKED = [
    "10.0.0.5",
    "172.16.0.1",
    "192.168.1.1",
    "127.0.0.1",
    "100.64.0.1",
    "169.254.169.254",
    "169.254.170.2",
    "0.0.0.0",
    "224.0.0.1",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd00:ec2::254",
    "fec0::1",
    "ff02::1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 around 169.254.169.254
    "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
    "2001:db8::1",
]


@pytest.mark.parametrize("ip", BLOCKED)
def test_names_resolving_to_non_public_addresses_are_blocked(ip, connections):
    resolver = fake_resolver({"intranet.test": [ip]})
    message = fails("blocked-address", f"http://intranet.test/x?k={SECRET}", resolver=resolver)
    assert "non-public" in message and ip not in message
    assert connections == []


@pytest.mark.parametrize(
    "ip",
    [
        "169.254.169.254",
        "169.254.1.1",
        "fe80::1",
        "fd00:ec2::254",
        "100.100.100.200",
        "::ffff:169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
def test_allow_private_never_opens_link_local_or_metadata(ip, connections):
    resolver = fake_resolver({"meta.test": [ip]})
    message = fails("blocked-address", "http://meta.test/", LOCAL, resolver=resolver)
    assert "never allowed" in message
    assert connections == []


@pytest.mark.parametrize("ip", ["10.0.0.5", "192.168.1.1", "100.64.0.1", "fd12::1", "::1"])
def test_allow_private_opens_intranet_ranges(ip, connections):
    resolver = fake_resolver({"intranet.test": [ip]})
    fails("fetch-error", "http://intranet.test/", LOCAL, resolver=resolver)
    assert connections == [(ip, 80)]  # the spy refused it; only loopback is ever dialled


def test_one_private_address_among_public_ones_blocks(connections):
    resolver = fake_resolver({"mixed.test": ["93.184.216.34", "10.0.0.5"]})
    fails("blocked-address", "http://mixed.test/", resolver=resolver)
    assert connections == []


def test_redirect_to_metadata_is_blocked_even_from_an_allowed_server(base, connections):
    message = fails("blocked-address", f"{base}/to-metadata", LOCAL)
    assert "http://169.254.169.254/latest/meta-data/" in message
    assert f"redirect from {base}/to-metadata" in message
    assert [address for address, _ in connections] == ["127.0.0.1"]


def test_redirect_target_is_resolved_and_checked_again(base, port, connections):
    # The first hop (loopback) is allowed; the name it redirects to resolves to metadata.
    resolver = fake_resolver({"intranet.test": ["169.254.169.254"]})
    fails("blocked-address", f"{base}/to-private-name", LOCAL, resolver=resolver)
    assert resolver.calls == ["intranet.test"]
    assert connections == [("127.0.0.1", port)]


def test_redirect_target_checked_against_allowed_hosts(base, port, connections):
    policy = HttpPolicy(enabled=True, allow_private=True, allowed_hosts=("127.0.0.1",))
    resolver = fake_resolver({"intranet.test": ["127.0.0.1"]})
    message = fails("host-not-allowed", f"{base}/to-private-name", policy, resolver=resolver)
    assert "intranet.test" in message
    assert resolver.calls == []  # refused before resolving
    assert connections == [("127.0.0.1", port)]


def test_unresolvable_host_is_a_fetch_error(connections):
    fails("fetch-error", "http://nowhere.test/", resolver=fake_resolver({}))
    assert connections == []


def test_resolver_returning_nothing_is_a_fetch_error():
    fails("fetch-error", "http://empty.test/", resolver=lambda *a, **k: [])


# --------------------------------------------------------------------------- policy and URLs


def test_disabled_by_default_and_says_how_to_enable(base, connections):
    message = fails("http-disabled", f"{base}/image.png?token={SECRET}", HttpPolicy())
    assert "EXPLAINCTL_ALLOW_HTTP=1" in message
    assert connections == []


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/image.png", "file:///etc/passwd", "gopher://x/", "image.png"]
)
def test_other_schemes_are_refused(url):
    fails("unsupported-scheme", url)


def test_redirect_to_another_scheme_is_refused(base):
    fails("unsupported-scheme", f"{base}/to-ftp", LOCAL)


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{SECRET}@example.com/a.png",
        "http://user@example.com/a.png",
        "http://example.com\\@127.0.0.1/",
    ],
)
def test_user_info_is_refused_without_echoing_it(url, connections):
    message = fails("bad-uri", url, resolver=fake_resolver({}))
    shown = message.rsplit(" ", 1)[1]
    assert "@" not in shown and "user" not in shown
    assert connections == []


def test_redirect_to_user_info_is_refused(base):
    fails("bad-uri", f"{base}/to-userinfo", LOCAL)


@pytest.mark.parametrize(
    "url",
    ["http:///a.png", "http://:80/", "http://exa mple.com/", "http://a%2eb/", "http://x:99999/"],
)
def test_malformed_hosts_are_bad_uris(url):
    fails("bad-uri", url, resolver=fake_resolver({}))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("images.example.com", True),
        ("IMAGES.example.com", True),
        ("cdn.example.org", False),  # the wildcard covers names below it only
        ("a.b.cdn.example.org", True),
        ("example.org", False),
        ("badcdn.example.org", False),
        ("example.com", False),
        ("images.example.com.evil.test", False),
    ],
)
def test_allowed_hosts(host, allowed, connections):
    policy = HttpPolicy(enabled=True, allowed_hosts=("Images.Example.com", "*.cdn.example.org"))
    resolver = fake_resolver({host.lower(): ["93.184.216.34"]})
    if allowed:
        fails("fetch-error", f"http://{host}/a.png", policy, resolver=resolver)  # spy refuses
        assert connections == [("93.184.216.34", 80)]
    else:
        fails("host-not-allowed", f"http://{host}/a.png", policy, resolver=resolver)
        assert resolver.calls == [] and connections == []


def test_allowed_host_still_has_its_addresses_checked(connections):
    policy = HttpPolicy(enabled=True, allowed_hosts=("images.example.com",))
    resolver = fake_resolver({"images.example.com": ["10.0.0.5"]})
    fails("blocked-address", "http://images.example.com/", policy, resolver=resolver)
    assert connections == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"allowed_hosts": "example.com"},
        {"allowed_hosts": ("*",)},
        {"allowed_hosts": ("a*.example.com",)},
        {"max_redirects": -1},
        {"timeout": 0},
    ],
)
def test_invalid_policies(kwargs):
    with pytest.raises(InvalidInput):
        HttpPolicy(**kwargs)


def test_invalid_max_bytes():
    with pytest.raises(InvalidInput):
        fetch_http("http://example.com/", max_bytes=-1, policy=ON)


# --------------------------------------------------------------------------- responses


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/missing", "not-found"),
        ("/gone", "not-found"),
        ("/forbidden", "access-denied"),
        ("/unauthorized", "access-denied"),
        ("/broken", "http-error"),
        ("/no-location", "http-error"),
    ],
)
def test_status_codes(base, path, code):
    message = fails(code, f"{base}{path}?token={SECRET}", LOCAL)
    assert message.startswith(f"{base}{path}")
    if path == "/broken":
        assert "HTTP 500" in message


def test_huge_content_length_is_refused_before_reading(base):
    message = fails("too-large", f"{base}/huge-header", LOCAL)
    assert "Content-Length 1000000000000" in message


def test_content_length_at_the_limit_is_fine(base):
    assert fetch_http(f"{base}/image.png", max_bytes=len(IMAGE), policy=LOCAL) == IMAGE
    fails("too-large", f"{base}/image.png", LOCAL, max_bytes=len(IMAGE) - 1)


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_body_without_length_stops_past_the_limit(base, framing):
    assert fetch_http(f"{base}/{framing}/1000", max_bytes=1000, policy=LOCAL) == b"x" * 1000
    message = fails("too-large", f"{base}/{framing}/200000", LOCAL, max_bytes=1000)
    assert "larger than 1000 bytes" in message


def test_connection_refused_is_a_fetch_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    fails("fetch-error", f"http://127.0.0.1:{closed_port}/?token={SECRET}", LOCAL)


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_server_that_drips_is_cut_off_at_the_deadline(base, path):
    policy = HttpPolicy(enabled=True, allow_private=True, timeout=0.5, deadline=1.5)
    message = fails("fetch-error", f"{base}{path}?token={SECRET}", policy)
    assert "not fetched within 1.5 s" in message


def test_timeout_is_a_fetch_error(base):
    policy = HttpPolicy(enabled=True, allow_private=True, timeout=0.2)
    message = fails("fetch-error", f"{base}/slow", policy)
    assert "timed out" in message


# --------------------------------------------------------------------------- https


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory):
    """A CA and a certificate for "localhost" signed by it; yields (ca_path, cert, key)."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, key, signer, ca, extra=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for extension in extra:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("explainctl test CA", "explainctl test CA", ca_key, ca_key, True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost")])
    leaf = build("localhost", "explainctl test CA", leaf_key, ca_key, False, [san])

    folder = tmp_path_factory.mktemp("tls")
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "leaf.key").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder


@pytest.fixture(scope="module")
def tls_port(tls) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls / "leaf.pem", tls / "leaf.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serve(server)


@pytest.fixture
def trust_test_ca(tls, monkeypatch: pytest.MonkeyPatch) -> None:
    context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    monkeypatch.setattr(fetch, "_tls_context", lambda: context)


LOCALHOST = fake_resolver({"localhost": ["127.0.0.1"], "images.test": ["127.0.0.1"]})


def test_https_fetch_verifies_the_name_from_the_url(tls_port, trust_test_ca, connections):
    url = f"https://localhost:{tls_port}/image.png"
    assert fetch_http(url, max_bytes=LIMIT, policy=LOCAL, resolver=LOCALHOST) == IMAGE
    assert connections == [("127.0.0.1", tls_port)]


def test_https_name_mismatch_is_refused(tls_port, trust_test_ca):
    # Same pinned address as above, but the certificate does not name images.test.
    url = f"https://images.test:{tls_port}/image.png"
    message = fails("fetch-error", url, LOCAL, resolver=LOCALHOST)
    assert "certificate" in message.lower() or "hostname" in message.lower()


def test_https_untrusted_certificate_is_refused(tls_port):
    url = f"https://localhost:{tls_port}/image.png"
    message = fails("fetch-error", url, LOCAL, resolver=LOCALHOST)
    assert "certificate verify failed" in message
