"""Tasks built on the generic parts: each brings its data generator, taxonomy and model recipe.

``secfed.models``, ``secfed.data`` and ``secfed.training`` serve any user's model and data; a
task (the demo's city safety in :mod:`secfed.tasks.citysafety`) is one user of them, kept here so
nothing generic depends on it.
"""
