"""The ``fmt-audit`` command line: thin click commands over the :mod:`fmt_audit` library."""
