"""The engine: the layer runner, the activation cache, the set-up of a run, the progressive and
one-shot loops, and `compress()`, which starts a method's run."""
