"""The engine on a Ray cluster: GPU workers as actors (:mod:`.worker`) behind front doors (:mod:`.door`)."""
