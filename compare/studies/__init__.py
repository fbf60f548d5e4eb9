"""Studies: commands that measure one question each (here: what the classic batch-norm mistakes do)."""
