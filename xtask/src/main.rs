//! `cargo xtask setup | build | run | test`: what a newcomer or CI runs.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks: nightly rust-src, bpf-linker built
    /// against nightly rustc's own LLVM, and the Debian packages tests use.
    Setup,
    /// Build the eBPF object and the `lb` binary.
    Build,
    /// Setup, build, then bring up the lab and show the load balancer; with
    /// --kubeconfig, run the agent against that cluster instead.
    Run {
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Extra arguments for `lb lab up` or `lb agent`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build `lb` (release) and write an OCI image archive of the agent, for
    /// `kind load image-archive`; no container engine needed.
    Image {
        /// Where to write the archive.
        #[arg(long, default_value = "target/lb-image.tar")]
        output: PathBuf,
        /// The image's name, as the DaemonSet names it.
        #[arg(long, default_value = "localhost/lb:0.1.0")]
        name: String,
    },
    /// Build `lb` (release) and measure: writes BENCHMARKS.md and
    /// benchmarks.svg at the top of the repository (needs root).
    Bench {
        /// A short run, to try the harness (figures not meaningful).
        #[arg(long)]
        quick: bool,
    },
    /// Setup, then formatting, clippy and every test (needs root).
    Test {
        /// Arguments passed to `cargo test` (a test name filter, for instance).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    // A CI run builds once from a fresh clone: incremental state would only
    // add gigabytes to its disk.
    if std::env::var_os("CI").is_some() {
        c.env("CARGO_INCREMENTAL", "0");
    }
    c
}

fn require_root(what: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root (BPF, network namespaces): run it with sudo");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn build() -> Result<()> {
    run(cargo().args(["build", "--package", "lb-userspace"]))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::Build => {
            setup::setup()?;
            build()
        }
        Cmd::Run { kubeconfig, args } => {
            require_root("cargo xtask run")?;
            setup::setup()?;
            build()?;
            let lb = root().join("target/debug/lb");
            let mut cmd = Command::new(&lb);
            match kubeconfig {
                Some(kc) => cmd.arg("agent").arg("--kubeconfig").arg(kc),
                None => cmd
                    .args(["lab", "up", "--demo", "--manifests"])
                    .arg(root().join("manifests/demo")),
            };
            // Ctrl-C reaches `lb` too, which tears the lab down; wait for it
            // rather than give the prompt back while it is still cleaning up.
            // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
            unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
            run(cmd.args(args))
        }
        Cmd::Image { output, name } => {
            setup::setup()?;
            // The agent and its CLI only: the lab and the benchmarks stay out.
            run(cargo().args([
                "build",
                "--release",
                "--package",
                "lb-userspace",
                "--no-default-features",
            ]))?;
            let output = if output.is_absolute() {
                output
            } else {
                root().join(output)
            };
            let bpftool = PathBuf::from("/usr/sbin/bpftool");
            let written = xtask::image::write_archive(
                &xtask::image::ImageSpec {
                    binary: root().join("target/release/lb"),
                    extra_programs: if bpftool.exists() {
                        vec![bpftool]
                    } else {
                        Vec::new()
                    },
                    name: name.clone(),
                },
                &output,
            )?;
            println!(
                "wrote {} ({name}, manifest {}, layer {} KiB, {} files)\nload it into kind with:\n  kind load image-archive {}",
                output.display(),
                written.manifest_digest,
                written.layer_bytes / 1024,
                written.files.len(),
                output.display()
            );
            Ok(())
        }
        Cmd::Bench { quick } => {
            require_root("cargo xtask bench")?;
            setup::setup()?;
            // The agents the benchmarks start run the build the image ships
            // (no lab, no benchmarks: its own target directory, so the two
            // builds do not replace each other).
            let agent_dir = root().join("target/agent-only");
            run(cargo()
                .args([
                    "build",
                    "--release",
                    "--package",
                    "lb-userspace",
                    "--no-default-features",
                    "--target-dir",
                ])
                .arg(&agent_dir))?;
            run(cargo().args(["build", "--release", "--package", "lb-userspace"]))?;
            let mut cmd = Command::new(root().join("target/release/lb"));
            cmd.env("LB_LAB_AGENT_BINARY", agent_dir.join("release/lb"));
            cmd.arg("bench").arg("--out").arg(root());
            if quick {
                cmd.arg("--quick");
            }
            run(&mut cmd)
        }
        Cmd::Test { args } => {
            require_root("cargo xtask test")?;
            setup::setup()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            // What the image ships: the agent without the lab and the benchmarks.
            run(cargo().args([
                "clippy",
                "--package",
                "lb-userspace",
                "--no-default-features",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The kernel crate, linted for its own target with nightly.
            run(Command::new("rustup")
                .args([
                    "run",
                    "nightly",
                    "cargo",
                    "clippy",
                    "--package",
                    "lb-ebpf",
                    "--release",
                ])
                .args([
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ])
                .current_dir(root()))?;
            run(cargo().args(["test"]).args(args))
        }
    }
}
