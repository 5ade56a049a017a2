"""ham-export: HAM (Hybrid Associative Memory) models to checked, compiled engines. The map of the package, and what
each part may import, is in ham_export/README.md."""
