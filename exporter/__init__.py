"""bitrix24-exporter: Bitrix24 chat and task counters for Prometheus."""

__version__ = "0.1.0"
