"""The coordinator: drives rounds with the protocol state machines, transport and SQLite state."""
