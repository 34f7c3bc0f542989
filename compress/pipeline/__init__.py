"""The life of a run directory: the runner, resume, gates, the report, and ``compress benchmark``'s reading of a
finished one (bench_target). Nothing below imports it."""
