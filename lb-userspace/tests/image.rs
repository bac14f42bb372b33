//! The agent's OCI image archive (`cargo xtask image`), checked with the
//! OCI tools Debian ships: skopeo reads and copies it (verifying every
//! digest), umoci unpacks it into a runtime bundle, and the entrypoint that
//! the image's own config names runs under chroot with `--version`.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

/// A scratch directory removed on drop, also when the test fails.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_image_archive_is_valid_oci_and_its_entrypoint_runs() {
    let dir = Scratch(std::env::temp_dir().join(format!("lb-image-test-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let archive = dir.0.join("lb.tar");
    let written = xtask::image::write_archive(
        &xtask::image::ImageSpec {
            binary: PathBuf::from(env!("CARGO_BIN_EXE_lb")),
            extra_programs: vec![PathBuf::from("/usr/sbin/bpftool")],
            name: "localhost/lb:test".into(),
        },
        &archive,
    )
    .unwrap();
    assert!(
        written.files.iter().any(|f| f.contains("libc.so")),
        "{:?}",
        written.files
    );

    // skopeo: the archive's manifest and config as a registry client sees them.
    let inspect: Value = serde_json::from_str(&run(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}:test", archive.display()))))
    .unwrap();
    assert_eq!(inspect["mediaType"], xtask::image::MEDIA_MANIFEST);
    assert_eq!(inspect["layers"].as_array().unwrap().len(), 1);
    let config: Value = serde_json::from_str(&run(Command::new("skopeo")
        .args(["inspect", "--config", "--raw"])
        .arg(format!("oci-archive:{}:test", archive.display()))))
    .unwrap();
    assert_eq!(config["os"], "linux");
    let entrypoint: Vec<String> =
        serde_json::from_value(config["config"]["Entrypoint"].clone()).unwrap();
    assert_eq!(entrypoint, vec![xtask::image::ENTRYPOINT.to_string()]);
    // A copy checks every blob against its digest.
    let copied = dir.0.join("copied");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci-archive:{}:test", archive.display()))
        .arg(format!("dir:{}", copied.display())));

    // What `kind load image-archive` reads: Docker's manifest.json naming
    // the image, beside the OCI index.
    let layout = dir.0.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    let docker: Value =
        serde_json::from_slice(&std::fs::read(layout.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(docker[0]["RepoTags"][0], "localhost/lb:test");
    for blob in docker[0]["Layers"].as_array().unwrap() {
        assert!(layout.join(blob.as_str().unwrap()).exists(), "{blob}");
    }

    // umoci: unpack into a runtime bundle; its rootfs is what a container sees.
    let bundle = dir.0.join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:test", layout.display()))
        .arg(&bundle));
    let runtime: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let args: Vec<String> = serde_json::from_value(runtime["process"]["args"].clone()).unwrap();
    assert_eq!(
        args,
        vec![xtask::image::ENTRYPOINT.to_string(), "agent".to_string()]
    );

    // The entrypoint runs in that root and nothing else: every library it
    // needs is in the image.
    let rootfs = bundle.join("rootfs");
    let version = run(Command::new("/usr/sbin/chroot")
        .arg(&rootfs)
        .arg(&args[0])
        .arg("--version")
        .env_clear());
    assert_eq!(version.trim(), format!("lb {}", env!("CARGO_PKG_VERSION")));
    // The DaemonSet's init container: the plugin copied onto the node and
    // chained into its CNI configuration; the copy answers as a plugin.
    let conf_dir = rootfs.join("host/etc/cni/net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(rootfs.join("host/opt/cni/bin")).unwrap();
    let kindnet = r#"{"cniVersion": "0.3.1", "name": "kindnet", "plugins": [{"type": "ptp"}, {"type": "portmap"}]}"#;
    std::fs::write(conf_dir.join("10-kindnet.conflist"), kindnet).unwrap();
    run(Command::new("/usr/sbin/chroot")
        .arg(&rootfs)
        .arg(&args[0])
        .args([
            "cni",
            "install",
            "--bin-dir=/host/opt/cni/bin",
            "--conf-dir=/host/etc/cni/net.d",
        ])
        .env_clear());
    let chained: Value =
        serde_json::from_slice(&std::fs::read(conf_dir.join("10-kindnet.conflist")).unwrap())
            .unwrap();
    assert_eq!(chained["plugins"][2]["type"], "lb-cni", "{chained}");
    let version: Value = serde_json::from_str(&run(Command::new("/usr/sbin/chroot")
        .arg(&rootfs)
        .arg("/host/opt/cni/bin/lb-cni")
        .env_clear()
        .env("CNI_COMMAND", "VERSION")))
    .unwrap();
    assert!(
        version["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&"1.0.0".into())),
        "{version}"
    );
    let help = run(Command::new("/usr/sbin/chroot")
        .arg(&rootfs)
        .args(["/usr/sbin/bpftool", "version"])
        .env_clear());
    assert!(help.contains("bpftool"), "{help}");
}
