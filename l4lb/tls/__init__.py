"""TLS: termination at the frontends, SNI routing, re-encryption to the servers."""
