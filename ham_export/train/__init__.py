"""Training with the threshold control loop (:mod:`.train`) and evaluation in bits per byte (:mod:`.evaluate`)."""
