"""The application on top of the engine: the `mtdl-fast` command, the trainer and its run
directory (checkpoints, reports, plots), datasets and the profiler."""
