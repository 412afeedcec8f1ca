"""The per-brand Lua scripts on a real Redis Cluster (three masters on private ports), and
what does not run there yet (docs/capacity.md, "Redis Cluster").

Every key of one brand carries the hash tag `{b:<brand>}` (worker/keys.py), so the scripts
that touch only a brand's keys - the receipt record and lock, the rate budget, the circuit
breaker - run on a Cluster as they do on one Redis, through redis-py's RedisCluster. The
result records and the schedule are global keys that admission, the gate and the fences
use together with a brand's keys in one script: on a Cluster that is a CROSSSLOT error,
which the last test pins down, so the capacity plan's "what Cluster still needs" stays true.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from support import wait_for

from worker import keys
from worker.audit import AuditTrail
from worker.breaker import CircuitBreaker
from worker.idempotency import ReceiptLock
from worker.ratelimit import BrandBudget, RatePolicy
from worker.store import ResultStore
from worker.testing.processes import RedisServer, free_port

SLOTS = ((0, 5460), (5461, 10922), (10923, 16383))
BRANDS = ("grill.az", "pizza_1", "acme")  # hash tags on the three nodes (slots 2505, 7975, 12848)


class ClusterNodeServer(RedisServer):
    """One master of a test cluster: a private redis-server with cluster mode on, its
    cluster bus on a free port of its own (the default, port + 10000, may be past 65535)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.bus_port = free_port()

    def config(self, binary: str) -> dict[str, str]:
        return super().config(binary) | {
            "cluster-enabled": "yes",
            "cluster-config-file": str(self.directory / "nodes.conf"),
            "cluster-node-timeout": "2000",
            "cluster-port": str(self.bus_port),
        }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    base = tmp_path_factory.mktemp("cluster")
    nodes = []
    try:
        for index, (first, last) in enumerate(SLOTS):
            directory = Path(base / f"node{index}")
            directory.mkdir()
            node = ClusterNodeServer(
                directory, None, persistent=False, detached=True, port_attempts=3
            )
            node.start()
            nodes.append(node)
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in nodes[1:]:
            nodes[0].client().execute_command(
                "CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port
            )

        def ready() -> bool:
            return all(
                "cluster_state:ok" in str(node.client().execute_command("CLUSTER", "INFO"))
                for node in nodes
            )

        wait_for(ready, timeout=30, what="the cluster's state ok")
        client = RedisCluster(host="127.0.0.1", port=nodes[0].port, decode_responses=True)
        yield client
        client.close()
    finally:
        for node in nodes:
            node.stop()


def test_the_brands_live_on_different_nodes(cluster: RedisCluster) -> None:
    owners = {str(cluster.get_node_from_key(keys.receipt(brand, 1))) for brand in BRANDS}
    assert len(owners) == len(BRANDS)


@pytest.mark.parametrize("brand", BRANDS)
def test_the_receipt_record_and_its_marker_on_a_cluster(cluster: RedisCluster, brand: str):
    trail = AuditTrail(cluster, ttl_seconds=600, max_attempts=3, fiscalised_ttl_seconds=900)
    trail.record_received(brand, 7, fiscal_id="F-7", device_id="p1")
    for outcome in ("not found", "closed", "fiscalised"):
        trail.record_attempt(brand, 7, call="GET", http_status=200, outcome=outcome)
    trail.set_state(brand, 7, "fiscalised", fiscal_id="F-7")
    trail.record_received(brand, 7, fiscal_id="OTHER")  # a later result: stays fiscalised
    record = trail.get(brand, 7)
    assert record is not None
    assert (record["state"], record["fiscal_id"]) == ("fiscalised", "F-7")
    assert record["device_id"] == "p1"
    assert [a["outcome"] for a in record["attempts"]] == ["not found", "closed", "fiscalised"]
    assert 600 < cluster.ttl(keys.receipt(brand, 7)) <= 900
    lock = ReceiptLock(cluster, brand, 7, "1-0", 1)
    assert lock.take() == (False, "F-7")  # the record is the marker: no call, no lock
    other = ReceiptLock(cluster, brand, 8, "2-0", 1)
    assert other.take() == (True, None)
    assert other.extend() is True
    assert ReceiptLock(cluster, brand, 8, "3-0", 1).acquire() is False  # held
    assert ReceiptLock(cluster, brand, 8, "2-0", 2).acquire() is True  # a newer dispatch
    assert other.extend() is False  # the older one lost it


@pytest.mark.parametrize("brand", BRANDS)
def test_the_rate_budget_and_the_breaker_on_a_cluster(cluster: RedisCluster, brand: str):
    now = time.time()
    budget = BrandBudget(cluster, RatePolicy(limit=60, window=60), clock=lambda: now)
    first = budget.reserve(brand, 2)
    assert first.ok
    assert budget.reserve(brand, 2).start > first.start  # the next slots, after these
    budget.pause(brand, 30)
    assert budget.paused_until(brand) == pytest.approx(now + 30)
    breaker = CircuitBreaker(cluster, threshold=2, clock=lambda: now)
    assert breaker.allow(brand).allowed
    breaker.record(brand, ok=False)
    breaker.record(brand, ok=False)
    assert not breaker.allow(brand).allowed  # open


def test_the_result_records_and_the_schedule_do_not_run_on_a_cluster_yet(cluster: RedisCluster):
    """What Cluster still needs (docs/capacity.md): a result's record and the schedule are
    global keys in different slots, used together in one script (and admission, the gate
    and the fences add a brand's keys to them)."""
    store = ResultStore(cluster, rate=RatePolicy())
    result = {"brand": BRANDS[0], "receipt_id": 1, "fiscal_id": "F-1"}
    with pytest.raises(redis.exceptions.RedisClusterException, match=r"(?i)slot"):
        store.create("1-0", result, "{}", score=time.time(), now=time.time())
    assert keys.brand_of(keys.result("1-0")) is None and keys.brand_of(keys.SCHEDULE) is None
