"""Listeners that present a run's events: widget, terminal, logs, alerts, report, plot."""
