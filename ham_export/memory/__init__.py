"""The memory report: byte counts of weights and state (:mod:`.sizes`), the cache fill measured on real text and
extrapolated to a context (:mod:`.fill`), the report and budget choice (:mod:`.report`), and its check against a
real decode (:mod:`.verify`); sizes with units (:mod:`.units`)."""
