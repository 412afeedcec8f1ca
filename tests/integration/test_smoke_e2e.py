"""First end-to-end: one closed receipt through a real worker; then a threads-pool worker
beside a prefork one, duplicates racing for the same receipts."""

from support import closed, dlq_entries, patches, wait_finished, wait_for, xadd


def test_one_result_is_fiscalised(r, fake, start_worker):
    fake.add_receipt("openapitest", closed(1))
    start_worker()
    xadd(r, {"receipt_id": 1, "brand": "openapitest", "fiscal_id": "F-1", "device_id": "printer-7"})
    wait_for(lambda: fake.receipt("openapitest", 1)["fiscal_id"] == "F-1", timeout=20)
    wait_finished(r)
    assert patches(fake, "openapitest", 1) == [{"fiscal_id": "F-1", "lock": True}]
    assert fake.receipt("openapitest", 1)["lock"] is True


def test_a_threads_pool_worker_beside_a_prefork_one_fiscalises_each_receipt_once(
    r, fake, start_worker
):
    receipts = range(1, 31)
    for receipt_id in receipts:
        fake.add_receipt("openapitest", closed(receipt_id))
    start_worker("threads", concurrency=16, pool="threads")
    start_worker("prefork", concurrency=2)
    for _ in range(2):  # every result twice: two runs race for each receipt
        for receipt_id in receipts:
            xadd(
                r,
                {"receipt_id": receipt_id, "brand": "openapitest", "fiscal_id": f"F-{receipt_id}"},
            )
    wait_for(lambda: all(fake.receipt("openapitest", i)["lock"] for i in receipts), timeout=60)
    wait_finished(r, timeout=60)
    for receipt_id in receipts:
        assert patches(fake, "openapitest", receipt_id) == [
            {"fiscal_id": f"F-{receipt_id}", "lock": True}
        ]
    assert dlq_entries(r) == []
