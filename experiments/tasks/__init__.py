"""The tasks the loop trains: each brings its data, model, loss and metrics."""
