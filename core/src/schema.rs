//! SCAFFOLD: module schema (being written).
