"""Southbound targets: which agent a control-plane request may reach.

A target is ``/_proxy/agents/{ip}/{port}/{path}``, read from the raw request target. The
proxy must never become an open proxy, so only a literal IP in its canonical form, inside
``networks.agents``, on a port in ``agents.ports`` is accepted; the classes below are
refused whatever the configuration says.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from .config import Config
from .errors import ProxyError

_SEPARATORS = re.compile(r"[/\\]")  # what an agent may split a decoded segment at
_OVERLONG_DOT = re.compile(rb"\xc0\xae|\xe0\x80\xae")  # "." in UTF-8 forms decoders should refuse
_DECODE_ROUNDS = 4

PREFIX = "/_proxy/agents/"


@dataclass(frozen=True)
class Target:
    ip: str
    port: int
    path_and_query: str  # raw, as it goes to the agent, always starting with "/"


def _never_allowed(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is refused whatever the config says, or None."""
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local (metadata services live there)"
    if addr.is_multicast:
        return "multicast"
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    if isinstance(addr, ipaddress.IPv6Address) and (addr.ipv4_mapped or addr.sixtofour or addr.teredo):
        return "an IPv4 address embedded in IPv6"
    if addr.is_reserved and not addr.is_private:
        return "reserved"
    return None


def parse(raw_target: str, config: Config) -> Target:
    """Check a raw request target; raise ProxyError (400 or 403) naming what is wrong."""
    if not raw_target.startswith(PREFIX):
        raise ProxyError("bad-target", "southbound paths look like /_proxy/agents/{ip}/{port}/{path}")
    rest = raw_target[len(PREFIX):]
    path, sep, query = rest.partition("?")
    parts = path.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ProxyError("bad-target", "southbound paths look like /_proxy/agents/{ip}/{port}/{path}")
    ip_text, port_text = parts[0], parts[1]
    agent_path = "/" + (parts[2] if len(parts) == 3 else "")

    try:
        addr = ipaddress.ip_address(ip_text)
    except ValueError:
        raise ProxyError("bad-target", f"{ip_text!r} is not a literal IP address (host names are never accepted)") from None
    reason = _never_allowed(addr)
    if reason:
        raise ProxyError("target-forbidden", f"{ip_text} is {reason}; never a target")
    if str(addr) != ip_text:
        # 010.0.0.2, 0xa.0.0.2, 167772162, 10.2, upper-case or uncompressed IPv6 ...
        raise ProxyError("bad-target", f"{ip_text!r} is not in canonical form (write {addr})")
    networks = config.networks.agents
    inside = [net for net in networks if addr.version == net.version and addr in net]
    if not inside:
        raise ProxyError("target-not-allowed", f"{ip_text} is outside networks.agents")
    if all(net.num_addresses > 2 and addr in (net.network_address, net.broadcast_address) for net in inside):
        raise ProxyError("target-forbidden", f"{ip_text} is a network or broadcast address")

    if not port_text.isdigit() or port_text != str(int(port_text)):
        raise ProxyError("bad-target", f"{port_text!r} is not a port number")
    port = int(port_text)
    if port not in config.agents.ports:
        raise ProxyError("target-not-allowed", f"port {port} is not in agents.ports")

    # A dot segment escapes (or, for ".", is meant to be normalised away) however it is
    # spelled: %2e%2e, or between encoded separators (a%2F..%2Fb, %5C..) that an agent may
    # decode before it splits. An encoded separator between names (cmd%2Fz) passes as sent.
    for segment in agent_path.split("/"):
        decoded = _as_an_agent_may_read(segment)
        if "\x00" in decoded or any(_is_dot_segment(part) for part in _SEPARATORS.split(decoded)):
            raise ProxyError("bad-target", "the agent path must not contain a '.' or '..' segment (however encoded) or a NUL")
    return Target(ip_text, port, agent_path + (sep + query if sep else ""))


def _as_an_agent_may_read(segment: str) -> str:
    """A path segment decoded as the most lenient agent would: percent-decoded until
    nothing changes (a server that decodes twice reads %252e as "."), with UTF-8's
    overlong forms of "." (%c0%ae) read as dots."""
    data = segment.encode("latin-1", "replace")
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote_to_bytes(data)
        if decoded == data:
            break
        data = decoded
    return _OVERLONG_DOT.sub(b".", data).decode("latin-1")


def _is_dot_segment(part: str) -> bool:
    """"." or "..", also with path parameters (``..;x``: servlet containers drop them)."""
    return part.split(";", 1)[0] in (".", "..")
