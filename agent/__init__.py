"""knowledger.agent"""
from .provenance import configure_threads as _configure_threads

_configure_threads()  # OpenMP passive wait before torch loads (issue 13; docs/benchmarks.md)
