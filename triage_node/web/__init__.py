"""Ops web server of ``triage-node up``: dashboard, JSON API, Prometheus /metrics, /healthz and /readyz.

``app`` serves HTTP; ``state`` reads the audit log into counts and recent studies; ``probes`` checks the broker,
workers, spool and model (readiness); ``metrics`` renders both as Prometheus families. ``static/`` holds the page.
"""

from .app import WebApp, WebConfigError, WebServer, check_config, is_loopback, start

__all__ = ["WebApp", "WebConfigError", "WebServer", "check_config", "is_loopback", "start"]
