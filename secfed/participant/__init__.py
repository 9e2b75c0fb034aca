"""The enterprise side of a federation: the ``secfed join`` loop."""
