"""CUDA backend: dispatch (which kernel runs a layer), native bindings, the registered ops, the mma layout, settings,
the CUDA sources and their CPU simulation (:mod:`.sim`). Importing :mod:`.dispatch` registers the ops."""
