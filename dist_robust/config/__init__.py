"""Configuration: the run config's sections, their command-line flags and run files, the DeepSpeed JSON, and the
one validation pass that reports every problem before any process starts."""
