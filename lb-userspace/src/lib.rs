//! The lb agent, its CLI and (with the `lab` feature, on by default) the lab
//! and the benchmarks. See README.md for the big picture.

pub mod agent;
#[cfg(feature = "lab")]
pub mod bench;
pub mod cni;
pub mod conntrack;
pub mod datapath;
#[cfg(feature = "lab")]
pub mod echo;
pub mod events;
pub mod flows;
pub mod health;
pub mod inspect;
#[cfg(feature = "lab")]
pub mod lab;
pub mod maglev;
pub mod metrics;
pub mod netns;
pub mod packet;
pub mod plan;
pub mod policy;
pub mod settings;
pub mod trace;
pub mod translate;
pub mod yaml;
