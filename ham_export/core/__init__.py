"""The HAM model and its checkpoints: the configuration (:mod:`.config`), the model in its parallel, prompt and
decode forms (:mod:`.model`), the checkpoint formats (:mod:`.checkpoint`), the bundled text corpus (:mod:`.data`)."""
