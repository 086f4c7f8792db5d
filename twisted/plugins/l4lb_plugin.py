"""twistd dropin: makes `twistd l4lb` available once l4lb is installed."""

from twisted.application.service import ServiceMaker

L4LB = ServiceMaker(
    "l4lb",
    "l4lb.tap",
    "A TCP (layer-4) load balancer for databases and custom protocols.",
    "l4lb",
)
