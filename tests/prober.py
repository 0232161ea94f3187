"""Probe an exporter's /metrics and /healthz from a process of its own, as Prometheus would.

    python -m tests.prober HOST PORT

Asks both paths one after the other over one keep-alive connection, every 10 ms, until its
stdin has a line; prints ``ready`` after the first round, then at the end one JSON line:
``{"worst": {path: seconds}, "count": rounds, "failures": [...]}``. A separate process, so
that nothing in the process that runs the exporter or the checks can slow a probe down or
hide a slow answer. An answer that is not 200, or that takes longer than the 10 s socket
timeout (a liveness bound, not a speed goal), is a failure. Used by tests/test_faults.py and
bench/faults.py.
"""

from __future__ import annotations

import http.client
import json
import select
import sys
import time


def main(host: str, port: int) -> None:
    worst = {"/metrics": 0.0, "/healthz": 0.0}
    count = 0
    failures: list[str] = []

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(host, port, timeout=10)

    conn = connect()
    while not select.select([sys.stdin], [], [], 0)[0]:
        for path in worst:
            started = time.monotonic()
            status: int | str
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                status = repr(exc)
                conn.close()
                conn = connect()
            worst[path] = max(worst[path], time.monotonic() - started)
            if status != 200:
                failures.append(f"{path}: {status}")
        count += 1
        if count == 1:
            print("ready", flush=True)
        time.sleep(0.01)
    print(json.dumps({"worst": worst, "count": count, "failures": failures[:10]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
