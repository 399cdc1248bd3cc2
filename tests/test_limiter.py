"""The limiter that waits (routing_app/delivery/limiter.py): our rate syntax, waiting rather
than dropping, and one window shared by every process through Redis."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from limits.storage import MemoryStorage

from routing_app.delivery.limiter import Limiter, rate_item
from tests.servers import ROOT, python_argv

TAKE_SCRIPT = """
import sys
from routing_app.delivery.limiter import limiter
allowed = sum(limiter().wait_s(sys.argv[1], sys.argv[2]) == 0 for _ in range(int(sys.argv[3])))
print("ALLOWED", allowed)
"""


def test_rates_are_read_in_the_projects_syntax():
    assert (rate_item("100/s").amount, rate_item("100/s").get_expiry()) == (100, 1)
    assert (rate_item("5/10s").amount, rate_item("5/10s").get_expiry()) == (5, 10)
    assert rate_item("600/m").get_expiry() == 60
    with pytest.raises(ValueError, match="'100 per s' is not valid"):
        rate_item("100 per s")


def test_over_the_limit_it_says_how_long_to_wait_and_takes_nothing():
    limiter = Limiter(MemoryStorage())
    assert [limiter.wait_s("channel:1", "3/m") for _ in range(3)] == [0, 0, 0]
    waits = [limiter.wait_s("channel:1", "3/m") for _ in range(2)]
    assert all(0 < w <= 60 for w in waits)
    assert limiter.wait_s("channel:2", "3/m") == 0  # another key has its own window
    assert limiter.wait_s("channel:1", "") == 0  # no rate: no limit


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs Redis (always there in CI)")
def test_two_processes_share_one_window_through_redis():
    env = {**os.environ, "REDIS_PREFIX": f"test-limiter-{uuid.uuid4().hex[:8]}"}
    key, rate, each = "provider:1", "15/m", 12
    procs = [
        subprocess.Popen(  # noqa: S603  (our own script, no shell)
            python_argv(TAKE_SCRIPT, key, rate, str(each)),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    allowed = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        allowed.append(int(out.split("ALLOWED")[-1]))
    assert sum(allowed) == 15  # 24 asked, 15 allowed between them: one window, not one each
    assert all(n >= 3 for n in allowed)  # each process took part
