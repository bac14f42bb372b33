//! The lb agent, its CLI and the lab. See README.md for the big picture.

pub mod agent;
pub mod bench;
pub mod conntrack;
pub mod datapath;
pub mod echo;
pub mod events;
pub mod flows;
pub mod health;
pub mod inspect;
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
