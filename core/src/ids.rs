//! SCAFFOLD: module ids (being written).
