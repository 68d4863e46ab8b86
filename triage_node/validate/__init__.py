"""``triage-node validate``: the site's ground truth (CSV or HL7 ORU^R01 reports) joined with the audit trail.

``truth`` reads and labels the ground truth, ``report`` joins and measures, ``render`` writes the HTML, JSON and
PNG report, ``cli`` is the command. No torch: it reads what the node recorded, it never re-runs the model.
"""
