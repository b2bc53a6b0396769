//! SCAFFOLD: module chunk (being written).
