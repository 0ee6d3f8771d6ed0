"""The one exception type whose message is shown to the user as it is."""


class TrimaskError(Exception):
    """A user-facing failure: the message is one clear sentence saying what to do.

    The CLI prints it as one line on stderr and exits non-zero; the service
    answers it with a 4xx and ``{"error": message}``.
    """
