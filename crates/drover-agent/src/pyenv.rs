//! Per-node Python virtual environments for `runtime_env.python` (being written).
