"""The command line: thin Typer commands that parse, make one core call, and render."""
