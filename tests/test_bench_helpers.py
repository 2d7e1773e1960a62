"""The benchmark's helpers: the load generator's figures, /proc memory readings, growth, the webhook sender."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from api_reads import endpoint_figures, endpoints, quantile
from lean_http import LeanClient
from memory_soak import growth_percent, memory_figures, parse_smaps_rollup, read_memory

SMAPS_ROLLUP = """\
55d0c7a4e000-7ffd3b5f9000 ---p 00000000 00:00 0                          [rollup]
Rss:               51200 kB
Pss:               40960 kB
Pss_Dirty:         30000 kB
Shared_Clean:      12000 kB
Private_Dirty:     30000 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
"""


def loadgen_output(**overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "requestedRate": 1000,
        "elapsedS": 20.0,
        "statuses": {"200": 20_000},
        "connectionErrors": 0,
        "latencyMs": {"1": 10_000, "2": 9_700, "8": 300},
        "connections": 12,
        "cpuS": 5.0,
    }
    return {**raw, **overrides}


def test_quantile_of_a_histogram_counts_every_sample() -> None:
    histogram = {1: 50, 2: 49, 9: 1}
    assert quantile(histogram, 0.5) == 2
    assert quantile(histogram, 0.49) == 1
    assert quantile(histogram, 0.99) == 9
    assert quantile(histogram, 1.0) == 9


def test_quantile_of_no_samples_is_none() -> None:
    assert quantile({}, 0.99) is None


def test_endpoint_figures_at_the_rate_asked_for_meet_the_target() -> None:
    f = endpoint_figures(loadgen_output())
    assert f["achieved_rate_per_s"] == 1000.0
    assert (f["p50_ms"], f["p99_ms"], f["max_ms"]) == (2, 8, 8)
    assert f["non_2xx"] == 0
    assert f["loadgen_cpu_percent"] == 25.0
    assert f["target_met"] is True


def test_a_p99_of_ten_whole_ms_may_be_over_ten_and_misses_the_target() -> None:
    f = endpoint_figures(loadgen_output(latencyMs={"1": 9_000, "10": 1_000}, statuses={"200": 10_000}))
    assert f["p99_ms"] == 10
    assert f["target_met"] is False


def test_non_2xx_answers_are_counted_and_miss_the_target() -> None:
    f = endpoint_figures(loadgen_output(statuses={"200": 19_990, "429": 10}))
    assert f["non_2xx"] == 10
    assert f["answered"] == 20_000
    assert f["target_met"] is False


def test_a_rate_below_the_target_misses_it_even_when_fast() -> None:
    f = endpoint_figures(loadgen_output(requestedRate=300, statuses={"200": 6_000}))
    assert f["achieved_rate_per_s"] == 300.0
    assert f["target_met"] is False


def test_endpoints_are_the_three_reads() -> None:
    assert endpoints("f1", "r1") == {
        "GET /api/v1/flows": "/flows",
        "GET /api/v1/runs/{id}": "/runs/r1",
        "GET /api/v1/runs?flowId=": "/runs?flowId=f1",
    }


def test_parse_smaps_rollup_reads_the_kb_fields() -> None:
    fields = parse_smaps_rollup(SMAPS_ROLLUP)
    assert fields["Rss"] == 51200
    assert fields["Pss"] == 40960
    assert "55d0c7a4e000-7ffd3b5f9000 ---p 00000000 00" not in fields


def test_read_memory_is_in_mb(tmp_path: Path) -> None:
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "smaps_rollup").write_text(SMAPS_ROLLUP)
    assert read_memory(123, proc=tmp_path) == {"rss_mb": 50.0, "pss_mb": 40.0}


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_read_memory_of_this_process_is_plausible() -> None:
    m = read_memory(os.getpid())
    assert 1 < m["pss_mb"] <= m["rss_mb"]


def test_growth_percent() -> None:
    assert growth_percent(50.0, 55.0) == 10.0
    assert growth_percent(50.0, 45.0) == -10.0
    assert growth_percent(0.0, 5.0) == 0.0


def test_memory_figures_judge_idle_and_growth_per_service() -> None:
    idle = {"gateway": {"rss_mb": 70.0, "pss_mb": 60.0}, "runner": {"rss_mb": 90.0, "pss_mb": 80.0}}
    loaded = {"gateway": {"rss_mb": 80.0, "pss_mb": 70.0}, "runner": {"rss_mb": 100.0, "pss_mb": 90.0}}
    soaked = {"gateway": {"rss_mb": 84.0, "pss_mb": 73.5}, "runner": {"rss_mb": 120.0, "pss_mb": 99.0}}
    figures = memory_figures(idle, loaded, soaked)
    assert figures["gateway"]["growth_rss_percent"] == 5.0
    assert figures["gateway"]["growth_pss_percent"] == 5.0
    assert figures["gateway"]["idle_target_met"] and figures["gateway"]["growth_target_met"]
    assert figures["runner"]["growth_rss_percent"] == 20.0
    assert not figures["runner"]["idle_target_met"]
    assert not figures["runner"]["growth_target_met"]


async def test_the_lean_sender_posts_over_kept_alive_connections_and_reads_each_answer() -> None:
    peers: set[object] = set()

    async def hook(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        body = await request.json()
        if body["v"] < 0:
            return web.json_response({"title": "refused"}, status=422)
        return web.json_response({"runId": f"r{body['v']}", "path": request.path}, status=202)

    app = web.Application()
    app.router.add_post("/hooks/{token}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sender = LeanClient(f"http://127.0.0.1:{port}", size=2)
    try:
        answers = await asyncio.gather(*(sender.post("/hooks/t", f'{{"v": {i}}}'.encode()) for i in range(20)))
        assert [status for status, _ in answers] == [202] * 20
        assert answers[7][1] == b'{"runId": "r7", "path": "/hooks/t"}'
        assert len(peers) == 2  # twenty requests, two connections kept open
        assert await sender.post("/hooks/t", b'{"v": -1}') == (422, b'{"title": "refused"}')
    finally:
        await sender.close()
        await runner.cleanup()


def test_the_lean_sender_takes_plain_http_only() -> None:
    with pytest.raises(ValueError, match="plain http"):
        LeanClient("https://example.test", size=1)
