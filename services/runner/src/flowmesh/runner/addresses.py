"""Which addresses ``http`` and ``llm`` steps may not reach (the SSRF guard's decision, without I/O).

Built from the IANA IPv4 and IPv6 Special-Purpose Address Registries: every range there that is not
globally reachable is refused, and the few globally reachable ones inside a refused block are let
through. ``ipaddress``'s ``is_global`` is not relied on: what it knows depends on the Python release,
and 3.11's calls global 192.0.0.8, 192.88.99.0/24, multicast, 6to4 ``2002::/16``, NAT64 towards a
private address (``64:ff9b::7f00:1``), ``64:ff9b:1::/48``, ``::7f00:1``, site-local ``fec0::/10``,
``3fff::/20`` and ``5f00::/16``, and not global the reachable 2001:3::/32 and 2001:20::/28 (its
``is_private``, which this guard used before, also let 100.64.0.0/10 through).

IPv6 is an allow list: only global unicast (``2000::/3``) minus the refused ranges, plus NAT64
``64:ff9b::/96`` judged by the IPv4 address it embeds (as is an IPv4-mapped ``::ffff:0:0/96``).
Everything else in the IPv6 space is reserved, unassigned, unique-local, link-local or multicast.
6to4 (``2002::/16``) and Teredo (``2001::/32``) are refused whole, whatever IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

REFUSED_V4: Final[tuple[ipaddress.IPv4Network, ...]] = tuple(
    _V4(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private use
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local (cloud metadata services)
        "172.16.0.0/12",  # private use
        "192.0.0.0/24",  # IETF protocol assignments (but see ALLOWED_V4)
        "192.0.2.0/24",  # documentation (TEST-NET-1)
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",  # private use
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation (TEST-NET-2)
        "203.0.113.0/24",  # documentation (TEST-NET-3)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255 (limited broadcast)
    )
)
ALLOWED_V4: Final[tuple[ipaddress.IPv4Network, ...]] = (
    _V4("192.0.0.9/32"),  # PCP anycast: globally reachable
    _V4("192.0.0.10/32"),  # TURN anycast: globally reachable
)

GLOBAL_UNICAST_V6: Final = _V6("2000::/3")
NAT64_V6: Final = _V6("64:ff9b::/96")
"""The well-known NAT64 prefix: its last 32 bits are the IPv4 address really reached."""
REFUSED_V6: Final[tuple[ipaddress.IPv6Network, ...]] = tuple(
    _V6(n)
    for n in (
        "2001::/23",  # IETF protocol assignments, Teredo 2001::/32 among them (but see ALLOWED_V6)
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4: reaches the IPv4 address it embeds, through any relay
        "3fff::/20",  # documentation
    )
)
ALLOWED_V6: Final[tuple[ipaddress.IPv6Network, ...]] = tuple(
    _V6(n)
    for n in (
        "2001:1::1/128",  # PCP anycast
        "2001:1::2/128",  # TURN anycast
        "2001:1::3/128",  # DNS-SD SRP anycast
        "2001:3::/32",  # AMT
        "2001:4:112::/48",  # AS112-v6
        "2001:20::/28",  # ORCHIDv2
        "2001:30::/28",  # drone remote ID entity tags
    )
)


def forbidden_address(address: str) -> bool:
    """True when an IP address is not globally reachable: not for http steps by default.

    Raises:
        ValueError: ``address`` is not an IP address (a host name).
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return _forbidden_v4(ip)
    if ip.ipv4_mapped is not None:
        return _forbidden_v4(ip.ipv4_mapped)
    bare = ipaddress.IPv6Address(ip.packed)  # without a zone (fe80::1%eth0)
    if bare in NAT64_V6:
        return _forbidden_v4(ipaddress.IPv4Address(bare.packed[-4:]))
    if bare not in GLOBAL_UNICAST_V6:
        return True
    return any(bare in n for n in REFUSED_V6) and not any(bare in n for n in ALLOWED_V6)


def legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a legacy numeric host means (``2130706433``, ``127.1``, ``0177.0.0.01``), else None.

    libc still reads these forms (``inet_aton``) while aiohttp refuses to connect to a host of digits
    and dots that is not four decimal numbers: the guard must judge the address, not the spelling.
    None for a canonical address and for anything that is not digits and dots (a name, IPv6).
    """
    if not host or not host.replace(".", "").isdigit():
        return None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None  # canonical: judged as written


def _forbidden_v4(ip: ipaddress.IPv4Address) -> bool:
    return any(ip in n for n in REFUSED_V4) and not any(ip in n for n in ALLOWED_V4)
