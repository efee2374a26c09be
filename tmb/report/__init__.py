"""Reports for people: the auditor's self-contained HTML page (``tmb audit BUNDLE --html OUT``)."""

from tmb.report.html import Plot, TelemetrySection, render_html

__all__ = ["Plot", "TelemetrySection", "render_html"]
