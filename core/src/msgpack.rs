//! SCAFFOLD: module msgpack (being written).
