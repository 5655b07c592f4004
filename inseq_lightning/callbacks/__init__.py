"""Training-framework adapters onto the monitor. Each imports its framework only when asked for."""

__all__ = ["AttributionMonitor"]


def __getattr__(name):
    if name == "AttributionMonitor":
        from .lightning import AttributionMonitor

        return AttributionMonitor
    raise AttributeError(name)
