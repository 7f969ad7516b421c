"""Step benchmarks: the step variants compared (`variants`), the engine bench (`engine_bench`), the memory
bench in fresh processes (`memory_bench`) and its per-layer timeline table (`timeline_table`)."""
