"""Recovery after compression: distillation from the dense teacher, and its resumable state."""
