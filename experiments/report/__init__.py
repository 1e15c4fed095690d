"""A run's results as a Markdown report with PNG figures (:func:`report.make_report`)."""

from experiments.report.report import make_report

__all__ = ["make_report"]
