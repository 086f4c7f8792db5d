"""Health checking: active probes, the rise/fall counter, slow start, failover."""
