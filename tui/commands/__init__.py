"""The bodies of ``xray-tui``'s subcommands, one module per command (or family of them).

:mod:`tui.cli` parses the command line and calls ``args.func(args)``, one of
the ``cmd_*`` functions here. Each returns the exit status
(:mod:`tui.commands.errors`) or raises a one-line error.
"""
