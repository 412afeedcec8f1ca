"""fiscal-worker: applies fiscal-device results to closed Clopos receipts, once in effect."""
