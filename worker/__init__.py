"""fiscal-worker: applies fiscal-device results to closed Clopos receipts, exactly once in effect."""
