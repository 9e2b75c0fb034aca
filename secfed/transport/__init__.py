"""HTTPS transport with mutual TLS: the only place in secfed that opens sockets."""
