"""Celery tasks of fiscal-worker (thin shells around worker/)."""
