"""The `dra-pipe` command line: `main` builds the app from one module per command group; `common` holds the
options and helpers they share."""
