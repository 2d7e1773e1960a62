"""The SSRF guard against every special-purpose range (IANA registries), with a stubbed resolver.

No packet leaves the process: a name "resolves" to the address under test through a stand-in for
the system resolver, a refused address ends the request before any connection, and the event
loop's ``sock_connect`` fails the test should the guard ever let one through.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.abc import ResolveResult

from flowmesh.contracts.models.definition import HttpData
from flowmesh.runner import io_steps
from flowmesh.runner.addresses import forbidden_address
from flowmesh.runner.io_steps import GuardedResolver, HttpStep

# (address, why): one or two addresses inside each range that is not globally reachable
REFUSED = [
    ("0.0.0.0", "this network"),
    ("0.255.255.255", "this network"),
    ("10.0.0.1", "private"),
    ("100.64.0.1", "shared address space"),
    ("100.127.255.254", "shared address space"),
    ("127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local (metadata)"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.0.0.1", "IETF protocol assignments"),
    ("192.0.0.8", "IPv4 dummy address"),
    ("192.0.0.170", "NAT64 discovery"),
    ("192.0.0.255", "IETF protocol assignments"),
    ("192.0.2.1", "TEST-NET-1"),
    ("192.88.99.1", "deprecated 6to4 relay anycast"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.51.100.1", "TEST-NET-2"),
    ("203.0.113.1", "TEST-NET-3"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "limited broadcast"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::7f00:1", "deprecated IPv4-compatible"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:100.64.0.1", "IPv4-mapped shared address space"),
    ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
    ("64:ff9b::7f00:1", "NAT64 to loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 to link-local"),
    ("64:ff9b::6440:1", "NAT64 to shared address space"),
    ("64:ff9b:1::1", "local-use IPv4/IPv6 translation"),
    ("100::1", "discard-only"),
    ("2001::1", "Teredo"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("2001:2::1", "benchmarking"),
    ("2001:10::1", "deprecated ORCHID"),
    ("2001:1ff::1", "IETF protocol assignments"),
    ("2001:db8::1", "documentation"),
    ("2002::1", "6to4"),
    ("2002:7f00:1::1", "6to4 of 127.0.0.1"),
    ("2002:808:808::1", "6to4 of a public address: refused whole"),
    ("3fff::1", "documentation"),
    ("5f00::1", "segment routing"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%1", "link-local with a zone"),
    ("fec0::1", "deprecated site-local"),
    ("ff02::1", "multicast"),
]

ALLOWED = [
    ("8.8.8.8", "public"),
    ("100.63.255.255", "just below shared address space"),
    ("100.128.0.0", "just above shared address space"),
    ("192.0.0.9", "PCP anycast: globally reachable"),
    ("192.0.0.10", "TURN anycast: globally reachable"),
    ("192.31.196.1", "AS112-v4"),
    ("198.17.255.255", "just below benchmarking"),
    ("223.255.255.255", "just below multicast"),
    ("::ffff:8.8.8.8", "IPv4-mapped public"),
    ("64:ff9b::808:808", "NAT64 to a public address"),
    ("2001:1::1", "PCP anycast"),
    ("2001:3::1", "AMT"),
    ("2001:4:112::1", "AS112-v6"),
    ("2001:20::1", "ORCHIDv2"),
    ("2001:200::1", "just above IETF protocol assignments"),
    ("2606:4700:4700::1111", "public"),
    ("2620:4f:8000::1", "AS112 direct delegation"),
]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_special_purpose_addresses_are_refused(address: str, why: str) -> None:
    assert forbidden_address(address), why


@pytest.mark.parametrize(("address", "why"), ALLOWED)
def test_globally_reachable_addresses_are_allowed(address: str, why: str) -> None:
    assert not forbidden_address(address), why


class StubResolver:
    """Stands for the system resolver: every name resolves to ``address``."""

    address = ""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        fam = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        found: ResolveResult = {
            "hostname": host,
            "host": self.address,
            "port": port,
            "family": fam,
            "proto": 0,
            "flags": 0,
        }
        return [found]

    async def close(self) -> None:
        pass


async def no_connect(sock: socket.socket, address: Any) -> None:
    raise AssertionError(f"the guard let a connection to {address} through")


@pytest.fixture
async def guarded(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HttpStep]:
    monkeypatch.setattr(io_steps, "DefaultResolver", StubResolver)
    # should the guard let an address through, the test fails here instead of sending a packet
    monkeypatch.setattr(asyncio.get_running_loop(), "sock_connect", no_connect)
    s = HttpStep(allow_private=False, max_bytes=1024, default_timeout_ms=2000)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@pytest.mark.parametrize(("address", "why"), REFUSED)
async def test_a_name_resolving_to_a_refused_address_is_not_called(
    guarded: HttpStep, monkeypatch: pytest.MonkeyPatch, address: str, why: str
) -> None:
    monkeypatch.setattr(StubResolver, "address", address)
    outcome = await guarded.run(HttpData(url="http://target.example/path"), {}, "r:s")
    assert not outcome.ok and outcome.error_type == "forbidden-address", why


@pytest.mark.parametrize(("address", "why"), ALLOWED)
async def test_the_resolver_passes_globally_reachable_addresses(
    monkeypatch: pytest.MonkeyPatch, address: str, why: str
) -> None:
    # the resolver's answer only: nothing connects to these
    monkeypatch.setattr(io_steps, "DefaultResolver", StubResolver)
    monkeypatch.setattr(StubResolver, "address", address)
    found = await GuardedResolver().resolve("target.example", 80)
    assert [r["host"] for r in found] == [address], why


@pytest.mark.parametrize("host", ["100.64.0.1", "[2002:7f00:1::1]", "[64:ff9b::7f00:1]", "198.18.0.1", "[fd00::1]"])
async def test_a_refused_address_written_in_the_url_is_not_called(guarded: HttpStep, host: str) -> None:
    outcome = await guarded.run(HttpData(url=f"http://{host}/"), {}, "r:s")
    assert not outcome.ok and outcome.error_type == "forbidden-address"


@pytest.mark.parametrize("host", ["2130706433", "017700000001", "127.1", "0177.0.0.01", "10.1", "0"])
async def test_a_refused_address_in_a_legacy_numeric_form_is_a_forbidden_address(guarded: HttpStep, host: str) -> None:
    """libc reads these forms as IPv4 addresses and aiohttp refuses to connect to them: the guard names them."""
    outcome = await guarded.run(HttpData(url=f"http://{host}:8080/"), {}, "r:s")
    assert not outcome.ok and outcome.error_type == "forbidden-address", outcome.message
    assert not outcome.retryable


async def test_a_public_address_in_a_legacy_numeric_form_is_a_configuration_error(guarded: HttpStep) -> None:
    outcome = await guarded.run(HttpData(url="http://134744072/"), {}, "r:s")  # 8.8.8.8
    assert not outcome.ok and outcome.error_type == "configuration" and not outcome.retryable
    assert "8.8.8.8" in str(outcome.message)
