"""Paths of the project, relative to its root (as real projects keep them)."""

from pathlib import Path

ROOT = Path(__file__).parent
PATHS = {"raw": ROOT / "data" / "raw" / "weather.csv", "features": ROOT / "data" / "features"}
