"""asv benchmarks for anybn: the core per backend, and the peers it is measured against."""
