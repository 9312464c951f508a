"""Stage 2, rewriting shards: byte-range surgery planned from headers, written to a hidden directory
renamed into place, verified. Imports no torch and never the calibration stage."""
