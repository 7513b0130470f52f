//! br2k core.
