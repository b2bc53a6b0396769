//! SCAFFOLD: module session (being written).
