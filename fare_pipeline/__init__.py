"""The FARE diagnostic pipeline (paper arXiv:2603.27141): prompt set, FSP profiling, AALS, operating point."""
