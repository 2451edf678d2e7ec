//! Safe unpacking of `runtime_env.working_dir` archives (being written).
