"""Training with the threshold control loop (:mod:`.train`), evaluation in bits per byte (:mod:`.evaluate`) and the
associative-recall task (:mod:`.recall`)."""
