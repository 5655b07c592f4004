"""The one interface every sink implements."""

from ..monitor.report import MonitorReport


class Sink:
    """Receives every :class:`MonitorReport`; must not modify it. Errors are isolated by the monitor."""

    def log_report(self, report: MonitorReport) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush what is buffered; called at the end of training."""
