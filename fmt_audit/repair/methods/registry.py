"""The shipped repair methods, by name: the default first. Adding one is a file and a line here."""

from __future__ import annotations

from fmt_audit.repair.methods.anp import ANP
from fmt_audit.repair.methods.base import RepairMethod
from fmt_audit.repair.methods.clp import CLP
from fmt_audit.repair.methods.fmt import FMT
from fmt_audit.repair.methods.fp import FP
from fmt_audit.repair.methods.ft import FT
from fmt_audit.repair.methods.ibau import IBAU

METHODS: dict[str, RepairMethod] = {method.name: method for method in (FMT, FT, FP, CLP, ANP, IBAU)}
DEFAULT = FMT.name
# what `compare` runs when the methods are not named
COMPARED = tuple(name for name, method in METHODS.items() if method.compared)
# the methods that remove channels the caller chooses (a scan report's, the trace's)
TAKE_CHANNELS = tuple(name for name, method in METHODS.items() if method.takes_channels)
