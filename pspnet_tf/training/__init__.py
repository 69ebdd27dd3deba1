"""Training: the recipe, ``compile_for_training`` and ``train`` (``recipe``), the config's
keys and checks (``config``), the run's data read before anything is built (``data``),
the run folder (``run_folder``) and the epoch callbacks (``callbacks``), SGD with coupled
decay and the poly schedule (``optimizers``), several devices or hosts (``distributed``)."""
