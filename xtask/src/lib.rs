//! What `cargo xtask` does that tests also use.

pub mod image;
