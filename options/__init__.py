"""Command-line options: upstream's base, train and test options, presets, and the scripts' parsers and exit (cli)."""
