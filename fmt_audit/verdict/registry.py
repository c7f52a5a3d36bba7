"""The shipped verdict methods, by name: the default first. Adding one is a file and a line here."""

from __future__ import annotations

from fmt_audit.verdict.base import VerdictMethod
from fmt_audit.verdict.combined import COMBINED
from fmt_audit.verdict.margin import MARGIN

METHODS: dict[str, VerdictMethod] = {method.name: method for method in (COMBINED, MARGIN)}
DEFAULT = COMBINED.name
NO_VERDICT = "none"     # the CLI's and manifests' word for "compute no verdict"
CHOICES = (*METHODS, NO_VERDICT)
