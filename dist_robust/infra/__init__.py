"""What every layer stands on: process groups and rank discipline, ZeRO internals, storage (the only fsspec
importer), redaction, the console, build caches and frozen config sections."""
