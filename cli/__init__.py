"""The `kairos` command line: above every layer, one module per command group."""
