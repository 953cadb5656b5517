"""One thin module per subcommand: parse options, call core code, render."""
