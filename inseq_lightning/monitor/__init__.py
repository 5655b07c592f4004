"""Training-time monitoring without any training framework: probes, the monitor, drift, guards."""

from .alerts import Alert, AlertRule, AttributionAlertWarning, Stabilization
from .drift import DRIFT_METRICS, AttributionMap, evidence_mass, map_drift
from .guards import attribution_guard
from .history import DriftHistory, ProbeHistory
from .monitor import AttributionMonitorWarning, MonitoringError, ProbeMonitor
from .probes import Probe, ProbeSet
from .report import MonitorReport, ProbeResult

__all__ = [
    "DRIFT_METRICS", "Alert", "AlertRule", "AttributionAlertWarning", "AttributionMap", "AttributionMonitorWarning",
    "DriftHistory", "MonitorReport", "MonitoringError", "Probe", "ProbeHistory", "ProbeMonitor", "ProbeResult",
    "ProbeSet", "Stabilization", "attribution_guard", "evidence_mass", "map_drift",
]
