"""The Grafana dashboard of rayft's gauges, and where Ray's Grafana integration finds it.

Ray writes its own dashboards into `<ray temp dir>/session_latest/metrics/grafana/dashboards/`, and
the Grafana provisioning it writes beside them (`.../grafana/provisioning/dashboards/default.yml`)
loads every JSON file in that folder: a Grafana started with Ray's config shows rayft's dashboard
beside Ray's own once the file is there. Any other Grafana imports the same file.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

FILE = "rayft_grafana_dashboard.json"


def dashboard_json() -> str:
    return resources.files("rayft.dashboard").joinpath("grafana", FILE).read_text()


def ray_dashboards_dir(ray_temp_dir: str | Path = "/tmp/ray") -> Path:
    """Where Ray's head writes its Grafana dashboards (RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR, as
    Ray reads it, moves them)."""
    moved = os.environ.get("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR")
    return Path(moved) if moved else Path(ray_temp_dir) / "session_latest" / "metrics" / "grafana" / "dashboards"


def install(output: str | Path | None = None, ray_temp_dir: str | Path = "/tmp/ray") -> Path:
    """Write the dashboard to `output` (a file, or a folder to put it in), by default into the
    newest Ray session's Grafana dashboards folder; a FileNotFoundError when that folder is absent."""
    target = Path(output) if output is not None else ray_dashboards_dir(ray_temp_dir)
    if output is None and not target.is_dir():
        raise FileNotFoundError(f"{target}: no Ray session's Grafana folder here (start Ray on this node, "
                                "or give --output)")
    if target.is_dir():
        target = target / FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dashboard_json())
    return target
