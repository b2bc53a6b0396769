//! SCAFFOLD: module serde_value (being written).
