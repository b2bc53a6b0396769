//! SCAFFOLD: module package (being written).
