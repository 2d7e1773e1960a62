"""A network jail for the processes of a test stack: no packet to a non-loopback address, names stubbed.

Imported by Python at start-up (``sitecustomize``) when this directory is on ``PYTHONPATH`` and
``FLOWMESH_TEST_NETJAIL`` holds ``{"hosts": {name: address}, "connect": {address: port}}``:

- ``socket.getaddrinfo`` answers the names in ``hosts`` with their address, numeric hosts and
  ``localhost`` as usual, and any other name with "not known": no DNS query leaves the machine;
- ``socket.socket.connect`` sends a connection to an address listed in ``connect`` to that port of
  127.0.0.1 instead (a stand-in for a public server, served locally), and refuses any other
  destination that is not loopback, so even a broken SSRF guard cannot reach out.

The jail lives in Python's ``socket`` module, which asyncio's event loop calls; uvloop resolves and
connects in C (libuv) around it. So a jailed process runs on asyncio's loop
(``FLOWMESH_EVENT_LOOP=asyncio``, set here, whatever the environment said).

The SSRF tests (``test_api7_server_side_request_forgery.py``) run the services with it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from typing import Any

_JAIL = os.environ.get("FLOWMESH_TEST_NETJAIL")


def _install(config: dict[str, Any]) -> None:
    hosts: dict[str, str] = config.get("hosts", {})
    rewrites: dict[str, int] = config.get("connect", {})
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if isinstance(name, str) and name.lower().rstrip(".") in hosts:
            name = hosts[name.lower().rstrip(".")]
        elif isinstance(name, str) and name.lower() != "localhost":
            flags |= socket.AI_NUMERICHOST  # a number (in any form libc reads), never a DNS query
        return real_getaddrinfo(name, port, family, type, proto, flags)

    def destination(address: Any) -> Any:
        if not isinstance(address, tuple):
            return address  # a Unix socket
        host = str(address[0])
        if host in rewrites:
            return ("127.0.0.1", rewrites[host])
        if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            raise OSError(f"test network jail: no connection to {host} (only loopback is reachable)")
        return address

    def connect(self: socket.socket, address: Any) -> None:
        real_connect(self, _for(self, destination(address)))

    def connect_ex(self: socket.socket, address: Any) -> int:
        return real_connect_ex(self, _for(self, destination(address)))

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]


def _for(sock: socket.socket, address: Any) -> Any:
    """``address`` in the socket's family (a rewritten destination on an IPv6 socket is mapped)."""
    if isinstance(address, tuple) and sock.family == socket.AF_INET6 and ":" not in address[0]:
        return ("::ffff:" + address[0], address[1], 0, 0)
    return address


if _JAIL:
    os.environ["FLOWMESH_EVENT_LOOP"] = "asyncio"
    _install(json.loads(_JAIL))
