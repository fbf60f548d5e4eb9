"""Studies: commands that each answer one question about batch norm by running both sides."""
