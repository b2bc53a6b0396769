//! SCAFFOLD: module message (being written).
