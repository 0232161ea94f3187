"""bitrix24-exporter: Bitrix24 chat and task counters for Prometheus."""
