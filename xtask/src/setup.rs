//! Idempotent machine setup. Each step first checks whether it is needed,
//! so a set-up machine is done in about a second.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::run;

/// Debian packages the lab, the tests and the bench use (skopeo and umoci
/// check the OCI image that `cargo xtask image` writes; conntrack empties
/// Linux's table between the churn bench's modes; tcpdump, for captures
/// when a lab test is chased; make and gcc build jemalloc, the agent's
/// allocator).
const PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "curl",
    "ethtool",
    "skopeo",
    "umoci",
    "tcpdump",
    "make",
    "gcc",
];

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn works(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

pub fn setup() -> Result<()> {
    nightly_with_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    kubectl_present();
    Ok(())
}

/// kubectl is not in Debian's packages nor in the registries these machines
/// reach, so setup cannot install it; it says so, and the tests that drive
/// the lab with kubectl (lab_api, lab_kubectl, lab_kubectl_seeds) fail naming it.
fn kubectl_present() {
    if !works(Command::new("kubectl").args(["version", "--client"])) {
        eprintln!(
            "setup: kubectl is not on the PATH: lab_api, lab_kubectl and lab_kubectl_seeds will fail. Install \
             kubectl v1.32 (https://kubernetes.io/docs/tasks/tools/) and run again."
        );
    }
}

fn nightly_with_rust_src() -> Result<()> {
    if !works(Command::new("rustc").arg("+nightly").arg("--version")) {
        eprintln!("setup: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// bpf-linker must use the same LLVM as nightly rustc, so it is built against
/// the libLLVM that ships in nightly's sysroot. Its RUNPATH points at the
/// prefix directory made here, which therefore lives in CARGO_HOME.
fn bpf_linker() -> Result<()> {
    if works(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV does not name its LLVM version")?
        .trim()
        .to_string();
    let major = llvm.split('.').next().unwrap_or_default().to_string();
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let lib_dir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib_dir.display()))?;
    let prefix = cargo_home().join("lb-llvm-prefix");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)?;
    }
    eprintln!("setup: building bpf-linker against nightly's LLVM {llvm} (takes a minute or two)");
    run(Command::new("cargo")
        .args([
            "install",
            "--force",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
