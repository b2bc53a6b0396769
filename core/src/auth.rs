//! SCAFFOLD: users, scopes and tokens (being written).
