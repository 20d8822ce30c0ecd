"""Running the parties: process supervision, file watching, atomic writes, state-directory layout."""
