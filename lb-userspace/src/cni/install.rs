//! `lb cni install | uninstall`: put the plugin on a node and chain it
//! after the node's CNI (the DaemonSet's init container runs install).
//!
//! The runtime uses the first network configuration in its directory, by
//! name; lb-cni goes at the end of that file's `plugins`, after the plugin
//! that makes the veth. The file is rewritten whole through a rename, so a
//! runtime never reads half of it.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::PLUGIN_TYPE;

/// What the chain entry says (the plugin's `NetConf`).
#[derive(Clone, Debug)]
pub struct Entry {
    pub interface_prefix: String,
    pub pin_dir: PathBuf,
    pub timeout_seconds: f64,
}

impl Entry {
    pub fn to_json(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "interfacePrefix": self.interface_prefix,
            "pinDir": self.pin_dir,
            "timeoutSeconds": self.timeout_seconds,
        })
    }
}

/// `conflist` with lb-cni last in its plugins (an earlier lb-cni entry
/// replaced); `None` when it is so already.
pub fn chain(conflist: &Value, entry: &Entry) -> Result<Option<Value>> {
    let plugins = plugins(conflist)?;
    let mut out: Vec<Value> = plugins
        .iter()
        .filter(|p| p["type"] != PLUGIN_TYPE)
        .cloned()
        .collect();
    if out.is_empty() {
        bail!("the configuration has no plugin to chain lb-cni after");
    }
    out.push(entry.to_json());
    if out == *plugins {
        return Ok(None);
    }
    let mut conflist = conflist.clone();
    conflist["plugins"] = Value::Array(out);
    Ok(Some(conflist))
}

/// `conflist` without lb-cni; `None` when it had none.
pub fn unchain(conflist: &Value) -> Result<Option<Value>> {
    let plugins = plugins(conflist)?;
    let kept: Vec<Value> = plugins
        .iter()
        .filter(|p| p["type"] != PLUGIN_TYPE)
        .cloned()
        .collect();
    if kept.len() == plugins.len() {
        return Ok(None);
    }
    let mut conflist = conflist.clone();
    conflist["plugins"] = Value::Array(kept);
    Ok(Some(conflist))
}

fn plugins(conflist: &Value) -> Result<&Vec<Value>> {
    conflist["plugins"].as_array().context(
        "not a network configuration list (no \"plugins\"): lb-cni chains into a .conflist",
    )
}

/// The file the runtime reads: the first configuration by name (as libcni
/// orders `.conf`, `.conflist` and `.json` files).
pub fn active_config(conf_dir: &Path) -> Result<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .with_context(|| format!("reading {}", conf_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "conf" || x == "conflist" || x == "json")
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .with_context(|| format!("no CNI configuration in {}", conf_dir.display()))
}

/// The active configuration's path and its JSON.
fn read_active_config(conf_dir: &Path) -> Result<(PathBuf, Value)> {
    let config = active_config(conf_dir)?;
    let current = serde_json::from_slice(&std::fs::read(&config)?)
        .with_context(|| format!("{} is not JSON", config.display()))?;
    Ok((config, current))
}

/// Writes `contents` to `path` through a rename in the same directory (the
/// temporary name has no extension a runtime reads).
fn write_whole(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("path without a directory")?;
    let name = path.file_name().context("path without a name")?;
    let tmp = dir.join(format!(".{}.lb-tmp", name.to_string_lossy()));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Copies this executable to `bin_dir/lb-cni` and chains it into the
/// active configuration in `conf_dir`. Run again, it changes nothing.
pub fn install(bin_dir: &Path, conf_dir: &Path, entry: &Entry) -> Result<()> {
    let me = own_executable()?;
    let plugin = bin_dir.join(PLUGIN_TYPE);
    write_whole(&plugin, &me, 0o755)?;
    let (config, current) = read_active_config(conf_dir)?;
    match chain(&current, entry).with_context(|| config.display().to_string())? {
        Some(new) => {
            write_whole(&config, &serde_json::to_vec_pretty(&new)?, 0o644)?;
            println!("{}: lb-cni chained; {}", config.display(), plugin.display());
        }
        None => println!("{}: lb-cni already chained", config.display()),
    }
    Ok(())
}

/// This executable's bytes: through /proc, or where it was started from
/// when /proc is not mounted (a bare chroot).
fn own_executable() -> Result<Vec<u8>> {
    std::fs::read("/proc/self/exe").or_else(|e| {
        let argv0 = std::env::args_os().next().map(PathBuf::from);
        match argv0 {
            Some(p) if p.is_absolute() => {
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
            }
            _ => Err(e).context("reading /proc/self/exe"),
        }
    })
}

/// Takes lb-cni out of the active configuration (before removing lb, so
/// new pods do not wait for an agent that is gone).
pub fn uninstall(conf_dir: &Path) -> Result<()> {
    let (config, current) = read_active_config(conf_dir)?;
    if let Some(new) = unchain(&current)? {
        write_whole(&config, &serde_json::to_vec_pretty(&new)?, 0o644)?;
        println!("{}: lb-cni removed", config.display());
    }
    Ok(())
}
