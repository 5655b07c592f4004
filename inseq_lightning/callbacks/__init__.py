"""Training-framework adapters onto the monitor. Each imports its framework only when asked for."""

__all__ = ["AttributionCallback", "AttributionMonitor"]


def __getattr__(name):
    if name == "AttributionMonitor":
        from .lightning import AttributionMonitor

        return AttributionMonitor
    if name == "AttributionCallback":
        from .hf import AttributionCallback

        return AttributionCallback
    raise AttributeError(name)
