"""A 200 MB input uploaded and a 200 MB artifact downloaded through a real `sciorch serve`
child keep its memory flat: RSS growth under 50 MB for each (bench/transfer.py measures,
and prints get_entry's latency during each transfer against idle)."""

from __future__ import annotations

import pytest

from bench.transfer import measure, report

pytestmark = pytest.mark.asyncio


@pytest.mark.timeout(600)
async def test_a_200_mb_upload_and_download_keep_the_servers_rss_flat() -> None:
    figures = await measure(200, 50)
    report(figures)
    for name in ("upload", "download"):
        assert figures[name]["rss_growth_mb"] < 50, (name, figures[name])
        assert figures[name]["calls"] > 0  # other calls were answered during the transfer
