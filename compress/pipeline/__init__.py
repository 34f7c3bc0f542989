"""The life of a run directory: the runner, resume, gates and the report. Nothing below imports it."""
