"""Checking an artifact against the eager model: the comparator and its tolerance policy (:mod:`.compare`), the
prompts it runs (:mod:`.prompts`), and thresholds that no score lands on (:mod:`.thresholds`)."""
