"""The reproductions of ``python -m experiments.sweep``: planning their runs, aggregating
and reporting the finished ones; the speed and statistics sweeps measure their own."""
