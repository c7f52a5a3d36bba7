"""The repair methods, one file each (:mod:`.fmt`, :mod:`.ft`, :mod:`.fp`, :mod:`.clp`, :mod:`.anp`, :mod:`.ibau`),
and their registry (:mod:`.registry`). What a method is: :mod:`.base`."""
