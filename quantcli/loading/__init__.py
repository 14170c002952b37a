"""Loading user things: model factories, example inputs and data sources."""
