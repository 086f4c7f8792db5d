"""l4lb: a TCP (layer-4) load balancer built on Twisted."""
