//! The lb agent, its CLI and the lab. See README.md for the big picture.

pub mod datapath;
pub mod packet;
pub mod plan;
pub mod translate;
