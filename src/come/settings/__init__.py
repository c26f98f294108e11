"""The settings floor: the options objects, their parsing and checks, the method registry, the
Plan record; no torch at import, no engine."""
