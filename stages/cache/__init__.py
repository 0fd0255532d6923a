"""Stage 1: run the teacher once and write its targets to the cache (plan -> worker -> run)."""
