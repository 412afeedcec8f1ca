"""First end-to-end: one closed receipt through a real worker."""

from support import closed, patches, wait_finished, wait_for, xadd


def test_one_result_is_fiscalised(r, fake, start_worker):
    fake.add_receipt("openapitest", closed(1))
    start_worker()
    xadd(r, {"receipt_id": 1, "brand": "openapitest", "fiscal_id": "F-1", "device_id": "printer-7"})
    wait_for(lambda: fake.receipt("openapitest", 1)["fiscal_id"] == "F-1", timeout=20)
    wait_finished(r)
    assert patches(fake, "openapitest", 1) == [{"fiscal_id": "F-1", "lock": True}]
    assert fake.receipt("openapitest", 1)["lock"] is True
