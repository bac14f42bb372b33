//! `cargo xtask image`: an OCI image archive of the agent, written without a
//! container engine. The one layer holds `lb` (and `bpftool`, so maps can be
//! dumped from inside the pod) with the shared libraries `ldd` names, at the
//! paths the dynamic loader looks for them. The archive is an OCI image
//! layout (`oci-layout`, `index.json`, `blobs/sha256/...`) that also carries
//! Docker's `manifest.json`, as `docker save` writes it, so both
//! `kind load image-archive` (containerd's import) and OCI tools take it.
//! Everything is written with fixed times and owners: the same inputs give
//! the same digests.

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Where the agent binary lives in the image.
pub const ENTRYPOINT: &str = "/usr/local/bin/lb";

pub struct ImageSpec {
    /// The `lb` binary to ship.
    pub binary: PathBuf,
    /// Other programs to ship at their own absolute paths (bpftool).
    pub extra_programs: Vec<PathBuf>,
    /// `localhost/lb:0.1.0`: the name kind's nodes will know it by.
    pub name: String,
}

/// What was written: the manifest digest, for the report.
pub struct Written {
    pub manifest_digest: String,
    pub layer_bytes: usize,
    pub files: Vec<String>,
}

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The shared libraries (and the loader) a program needs, by absolute path.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .with_context(|| format!("running ldd {}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: nothing to add.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed", program.display());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        if line.contains("not found") {
            bail!("{}: {}", program.display(), line.trim());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// The layer as an uncompressed tar: every file at its path (contents of
/// symlinks followed), with its parent directories.
fn layer_tar(files: &[(PathBuf, PathBuf)]) -> Result<Vec<u8>> {
    let mut dirs = BTreeSet::new();
    for (dest, _) in files {
        let mut p = dest.parent();
        while let Some(d) = p.filter(|d| *d != Path::new("/")) {
            dirs.insert(d.to_path_buf());
            p = d.parent();
        }
    }
    // Runtimes mount these; an empty /tmp is for tools that want one.
    for d in ["/proc", "/sys", "/dev", "/tmp", "/etc"] {
        dirs.insert(PathBuf::from(d));
    }
    let mut b = tar::Builder::new(Vec::new());
    let rel = |p: &Path| p.strip_prefix("/").unwrap_or(p).to_path_buf();
    for d in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(if d == Path::new("/tmp") {
            0o1777
        } else {
            0o755
        });
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        b.append_data(&mut h, rel(d), std::io::empty())?;
    }
    for (dest, src) in files {
        let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o755);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, rel(dest), data.as_slice())?;
    }
    Ok(b.into_inner()?)
}

/// Writes the image archive of `spec` to `out`.
pub fn write_archive(spec: &ImageSpec, out: &Path) -> Result<Written> {
    let (repo, tag) = spec
        .name
        .rsplit_once(':')
        .filter(|(r, t)| !r.is_empty() && !t.is_empty() && !t.contains('/'))
        .context("image name must be REPOSITORY:TAG")?;
    let mut files: Vec<(PathBuf, PathBuf)> = vec![(PathBuf::from(ENTRYPOINT), spec.binary.clone())];
    for program in &spec.extra_programs {
        files.push((program.clone(), program.clone()));
    }
    let mut libs = BTreeSet::new();
    for (_, src) in files.clone() {
        libs.extend(shared_libraries(&src)?);
    }
    files.extend(libs.into_iter().map(|l| (l.clone(), l)));

    let tar = layer_tar(&files)?;
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar)?;
    let layer = gz.finish()?;
    let layer_digest = sha256(&layer);

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Cmd": ["agent"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
            "Labels": {"org.opencontainers.image.title": "lb agent"},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len()}],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                // containerd's import names the image by this one...
                "io.containerd.image.name": format!("{repo}:{tag}"),
                // ...OCI tools (umoci, skopeo oci-archive:FILE:TAG) by this.
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;
    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let docker_manifest = serde_json::to_vec(&json!([{
        "Config": blob(&config_digest),
        "RepoTags": [format!("{repo}:{tag}")],
        "Layers": [blob(&layer_digest)],
    }]))?;

    let mut archive = tar::Builder::new(
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    let mut add = |path: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        archive.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    add("manifest.json", &docker_manifest)?;
    add(&blob(&layer_digest), &layer)?;
    add(&blob(&config_digest), &config)?;
    add(&blob(&manifest_digest), &manifest)?;
    archive.into_inner()?.flush()?;
    Ok(Written {
        manifest_digest,
        layer_bytes: layer.len(),
        files: files.iter().map(|(d, _)| d.display().to_string()).collect(),
    })
}
