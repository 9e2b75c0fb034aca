"""Secure aggregation round state machines (SecAgg, SecAgg+, CKKS): messages in, messages out, no I/O."""
