"""Celery entry point: ``celery -A workers.app worker -Q infer`` (thin tasks; logic lives in triage_node)."""
