"""The l4lb benchmark: l4lb beside HAProxy and other proxies, with real clients.

Run ``python -m bench --help``; see ``docs/benchmarks.md``.  Not part of the
installed package: it runs from a checkout.
"""
