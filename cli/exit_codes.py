"""The CLI's exit codes, in one place: every command and the group read them from here."""

OK = 0
SUSPICIOUS = 1          # --fail-on-suspicious: a model needs a closer look
PERSISTS = 1            # repair --fail-if-persists: the self-check says the backdoor may persist
INPUT_ERROR = 2         # a usage or input error: one line on stderr
INTERNAL_ERROR = 3
INTERRUPTED = 130       # Ctrl-C; no partial output file is left
TERMINATED = 143        # SIGTERM; likewise
