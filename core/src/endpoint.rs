//! SCAFFOLD: the sans-IO RPC endpoint (being written).
