"""One module per `evip` sub-command; each defines `register(subparsers)` which adds its parser
and sets `func` (called with the parsed args, returns an exit code)."""
