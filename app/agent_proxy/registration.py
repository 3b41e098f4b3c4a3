"""`agent-proxy register` and `deregister`: tell the upstream where this proxy is.

    POST   {upstream.url}/api/v1/agent-proxies               {"proxy_id","url","version"}
    DELETE {upstream.url}/api/v1/agent-proxies/{proxy_id}

Both are signed with the shared secret (X-Agent-Proxy-Id, X-Agent-Proxy-Signature; empty
client IP). On a POST the upstream calls this proxy back at ``public_url`` to handshake
before it answers, so a proxy that is down or unreachable from the upstream cannot
register. Every failure becomes one line that says what to look at.

``wait_for_front`` (`register --wait-front SECONDS`) first waits until the node front
passes ``GET /_proxy/health`` to a worker: the handshake comes back that way, and at
boot the front may still be starting.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import sys
import time
from typing import Callable
from urllib.parse import quote, urlsplit

from . import __version__, features, relay, signing
from .config import Config, ConfigError
from .errors import CommandError, printable
from .hostport import hostport, local_host

API = "/api/v1/agent-proxies"


class _Upstream:
    """One signed request to the upstream, with the config's TLS settings and timeouts."""

    def __init__(self, config: Config):
        self.config = config
        self.url = config.upstream.url
        self.parts = urlsplit(self.url)
        self.secret = config.read_secret()

    def _connection(self) -> http.client.HTTPConnection:
        # The same TLS settings the relay uses (config checks already loaded the files).
        up, parts = self.config.upstream, self.parts
        if parts.scheme == "https":
            context = relay.client_context(up.ca_file, True, up.client_cert, up.client_key)
            return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=up.connect_timeout, context=context)
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=up.connect_timeout)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        target = self.parts.path.rstrip("/") + path
        proxy_id = self.config.proxy_id
        headers = {
            "X-Agent-Proxy-Id": proxy_id,
            "X-Agent-Proxy-Signature": signing.signature_header(self.secret, proxy_id, method, target, client_ip=""),
            "Accept": "application/json",
        }
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as exc:
                raise CommandError(
                    f"TLS with the upstream {self.url} failed: certificate verify failed: {exc.verify_message or exc.reason} "
                    f"(upstream.ca_file: {self.config.upstream.ca_file or 'system CAs'})"
                ) from None
            except ssl.SSLError as exc:
                raise CommandError(f"TLS with the upstream {self.url} failed: {exc.reason or exc}") from None
            except socket.timeout:
                raise CommandError(
                    f"cannot reach the upstream {self.url}: no connection within {self.config.upstream.connect_timeout:g} s"
                ) from None
            except OSError as exc:
                raise CommandError(f"cannot reach the upstream {self.url}: {exc.strerror or exc}") from None
            conn.sock.settimeout(self.config.upstream.read_timeout)
            try:
                conn.request(method, target, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except socket.timeout:
                raise CommandError(
                    f"the upstream {self.url} did not answer within {self.config.upstream.read_timeout:g} s"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise CommandError(f"talking to the upstream {self.url} failed: {exc}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {}
        return response.status, answer if isinstance(answer, dict) else {}

    def unexpected(self, status: int, answer: dict) -> CommandError:
        if status == 401:
            return CommandError(
                f"the upstream {self.url} refused this proxy's signature: {answer.get('description') or 'no reason given'} "
                f"(check that it holds the shared secret of proxy_id {self.config.proxy_id})"
            )
        reason = ": ".join(str(answer[k]) for k in ("title", "description") if answer.get(k))
        return CommandError(f"the upstream {self.url} answered {status}{': ' + reason if reason else ''}")


def compare_features(config: Config, answer: dict) -> list[str]:
    """Warnings: a feature the upstream expects (if it says) that this proxy lacks or has
    failed, and any failed feature. Judged on the states the upstream read from this proxy
    (``feature_states``), else on this config's own."""
    states = answer.get("feature_states")
    if not isinstance(states, dict):
        states = features.feature_map(config, config.failed_features)
    expected = answer.get("expected_features")
    expected = [str(name) for name in expected] if isinstance(expected, list) else []
    found = []
    for name in expected:
        if name not in states:
            found.append(f"the upstream expects feature {name}, which this proxy does not offer")
    for name, feature in states.items():
        if not isinstance(feature, dict) or feature.get("state") not in ("failed", "disabled"):
            continue
        said = f"the upstream expects feature {name}, which is" if name in expected else f"feature {name} is"
        if feature["state"] == "failed":
            found.append(f"{said} failed here: {feature.get('reason') or 'no reason given'}")
        elif name in expected:
            found.append(f"{said} disabled here")
    return found


def _warn(line: str) -> None:
    print(f"agent-proxy: warning: {printable(line, 400)}", file=sys.stderr)  # names from the upstream's answer


# Each probe of the front gives up after this long; a wait may end this much after its seconds.
FRONT_PROBE_TIMEOUT = 2.0


def _front_health(host: str, port: int, context: ssl.SSLContext) -> str | None:
    """None when the front answers ``GET /_proxy/health`` with 200, else what happened."""
    conn = http.client.HTTPSConnection(host, port, timeout=FRONT_PROBE_TIMEOUT, context=context)
    try:
        conn.request("GET", "/_proxy/health")
        status = conn.getresponse().status
    except socket.timeout:
        return f"no answer within {FRONT_PROBE_TIMEOUT:g} s"
    except ssl.SSLError as exc:
        return f"TLS failed: {exc.reason or exc}"
    except OSError as exc:
        return str(exc.strerror or exc)
    except http.client.HTTPException as exc:
        return str(exc) or type(exc).__name__
    finally:
        conn.close()
    return None if status == 200 else f"answered {status}"


def wait_for_front(config: Config, seconds: float) -> None:
    """Poll the node front (``front.bind``, a wildcard on loopback, and ``front.port``)
    about once a second until it passes /_proxy/health to a worker; CommandError naming
    the URL and the wait if it does not within ``seconds`` (0: one probe)."""
    host, port = local_host(config.front.bind), config.front.port
    url = f"https://{hostport(host, port)}/_proxy/health"
    # A local probe: the front's certificate is not checked (it names the public host, not
    # this address); the upstream checks it on its handshake.
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + seconds
    while (last := _front_health(host, port, context)) is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommandError(f"the front did not answer {url} within {seconds:g} s (last: {last})")
        time.sleep(min(1.0, left))


def register(config: Config, warn: Callable[[str], None] = _warn) -> str:
    """Register (or refresh); ``warn`` hears each line of compare_features()."""
    if not config.public_url:
        raise ConfigError([f"{config.source}: public_url: not set; the upstream needs it to reach this proxy"])
    upstream = _Upstream(config)
    status, answer = upstream.request(
        "POST", API, {"proxy_id": config.proxy_id, "url": config.public_url, "version": __version__}
    )
    if status in (200, 201):
        for line in compare_features(config, answer):
            warn(line)
        names = ", ".join(map(str, answer.get("features") or [])) or "none"
        how = "registered with" if status == 201 else "was already registered (refreshed) with"
        return (
            f"{config.proxy_id} {how} {upstream.url}; "
            f"the upstream reached this proxy at {config.public_url} (features: {names})"
        )
    if status == 502:
        reason = answer.get("description") or answer.get("title") or "no reason given"
        raise CommandError(
            f"the upstream {upstream.url} could not complete the handshake with this proxy "
            f"(public_url {config.public_url}): {reason}"
        )
    raise upstream.unexpected(status, answer)


def deregister(config: Config) -> str:
    upstream = _Upstream(config)
    status, answer = upstream.request("DELETE", f"{API}/{quote(config.proxy_id, safe='')}")
    if status in (200, 204):
        return f"{config.proxy_id} deregistered from {upstream.url}"
    if status == 404:
        # Deregistering twice is not an error: the end state is the one asked for.
        return f"{config.proxy_id} was not registered with {upstream.url}; nothing to do"
    raise upstream.unexpected(status, answer)
