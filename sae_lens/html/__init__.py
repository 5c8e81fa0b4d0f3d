"""Offline HTML front ends: feature dashboards, the prompt-centric view and the training report.

Every page is one self-contained file: inline CSS and JS written for this package, the data inlined,
and a Content-Security-Policy that forbids all network access.
"""

from sae_lens.html.dashboard import render_prompt_text, write_dashboard_html
from sae_lens.html.report import write_training_report

__all__ = ["render_prompt_text", "write_dashboard_html", "write_training_report"]
