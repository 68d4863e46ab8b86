"""Knowing how the model does at this site: shadow mode, input and output drift, local validation, a site point.

``mode``: live / shadow, switched at run time. ``profile``: the model package's reference profile of the films'
statistics (``inference.filmstats``) and scores, and the population stability index. ``drift``: the sliding window
of recent films against it. ``monitor``: the periodic evaluation in ``up`` / ``serve`` (state changes audited and
sent to flag channels). ``site``: the site operating point of ``triage-node calibrate --site``. ``stats``: AUC,
bootstrap and Wilson intervals without torch. ``docs/monitoring.md`` explains the choices.
"""
