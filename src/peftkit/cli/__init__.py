"""The ``peftkit`` command line: ``train``, ``eval``, ``generate``, ``info``, ``demo``."""
