//! Builds the eBPF programs (`lb-ebpf`) for the BPF target with the nightly
//! toolchain and bpf-linker, and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it (for `cargo check`
//! on machines without bpf-linker; the binary then cannot load programs).
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let ebpf = aya_build::Package {
        name: "lb-ebpf",
        root_dir: "../lb-ebpf",
        ..Default::default()
    };
    println!("cargo:rerun-if-changed=../lb-common");
    // aya-build turns each line the nested cargo prints on stderr into a
    // `cargo:warning`, so a clean build showed forty "warning: ... Compiling"
    // lines. Quiet, that cargo prints only its errors; compiler messages
    // (warnings and errors in lb-ebpf) still come through its JSON output,
    // and a failed build still fails here. Cargo refuses quiet and verbose
    // together. The build script is single-threaded at this point.
    env::set_var("CARGO_TERM_QUIET", "true");
    env::remove_var("CARGO_TERM_VERBOSE");
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())?;
    // With AYA_BUILD_SKIP the object is absent: leave an empty file so the
    // crate still compiles, and fail clearly at load time instead.
    let object = out_dir.join("lb");
    if !object.exists() {
        fs::write(&object, [])?;
    }
    Ok(())
}
