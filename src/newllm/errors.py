"""The error every user-facing failure raises: stages print its one-line message and exit non-zero."""


class PipelineError(RuntimeError):
    """Bad input (params, files, checkpoints) or an unavailable resource, explained in one line."""


class Diverged(PipelineError):
    """A training loss became NaN/inf: the run is a failure, not a result (its weights are garbage)."""
