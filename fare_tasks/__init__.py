"""fare-moe tasks: benchmark data layer, task helpers and metrics."""
