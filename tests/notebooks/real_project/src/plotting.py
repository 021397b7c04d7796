"""Helpers for the analysis notebooks."""


def month_label(month):
    return f"{month:02d}"
