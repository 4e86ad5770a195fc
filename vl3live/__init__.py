"""The command package, the top floor: every ``vl3live`` subcommand (``__main__.py`` holds the table).

Nothing imports a command; commands import everything (``model``, ``streamer``, ``ui``, ``training``).
"""
