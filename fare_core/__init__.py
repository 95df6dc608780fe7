"""Bottom layer shared by every fare-moe package: atomic file writes and version records
(:mod:`fare_core.files`), the one architecture table (:mod:`fare_core.adapters`) and the
fare-tiny model builder (:mod:`fare_core.tiny`). It imports no other fare package.

Import order of the packages (a package imports only those to its left):
fare_core < fare_tasks < fare_compression < fare_models < fare_analysis < fare_pipeline < fare_sweep
"""
