//! Packing a local `working_dir` into a deterministic archive (being written).
