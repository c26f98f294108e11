"""The `come` command line: the Typer app, its commands generated from the options objects, and
the generated blocks of the docs."""
