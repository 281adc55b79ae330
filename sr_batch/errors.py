"""The errors a user can act on. The CLI prints their message as one line, without a traceback."""


class SrBatchError(Exception):
    """A problem the user can fix; the message names what is wrong and how to fix it."""


class SpecError(SrBatchError):
    """The job spec is invalid."""


class SearchError(SrBatchError):
    """The STAC API could not be searched, or found nothing usable."""


class CheckpointError(SrBatchError):
    """A model checkpoint is missing, unsafe or does not fit the job."""


class OutputError(SrBatchError):
    """The output location cannot be written as asked."""
