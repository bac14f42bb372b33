//! The real kubectl (v1.32, on the PATH as on every machine of this kind)
//! pointed at a lab, with a discovery cache of the test's own.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use lb::lab::Lab;

pub struct Kubectl {
    kubeconfig: PathBuf,
    /// kubectl's HOME: its discovery cache is the test's own.
    home: PathBuf,
}

pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Kubectl {
    pub fn new(lab: &Lab) -> Self {
        let home = lab.kubeconfig_path().with_file_name("kubectl-home");
        std::fs::create_dir_all(&home).expect("kubectl home");
        Self::at(lab.kubeconfig_path(), home)
    }

    /// kubectl for `kubeconfig`, its discovery cache under `home` (an
    /// existing directory).
    pub fn at(kubeconfig: PathBuf, home: PathBuf) -> Self {
        Self { kubeconfig, home }
    }

    pub async fn try_run(&self, args: &[&str]) -> Run {
        self.try_run_with_input(args, "").await
    }

    /// kubectl with `input` on its stdin.
    pub async fn try_run_with_input(&self, args: &[&str], input: &str) -> Run {
        self.spawn(Command::new("kubectl").args(args), input).await
    }

    /// What `kubectl get -w ARGS` prints in its first `secs` seconds.
    pub async fn watch(&self, args: &[&str], secs: u32) -> String {
        let mut cmd = Command::new("timeout");
        cmd.arg(secs.to_string())
            .args(["kubectl", "get", "-w"])
            .args(args);
        self.spawn(&mut cmd, "").await.stdout
    }

    async fn spawn(&self, cmd: &mut Command, input: &str) -> Run {
        let mut cmd = std::mem::replace(cmd, Command::new("true"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let input = input.to_string();
        let out = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = cmd.spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(input.as_bytes())?;
            }
            child.wait_with_output()
        })
        .await
        .expect("join")
        .expect("running kubectl: it must be on the PATH (v1.32; cargo xtask setup warns when it is not)");
        Run {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs kubectl and returns its output; panics with its stderr if it fails.
    pub async fn run(&self, args: &[&str]) -> String {
        let r = self.try_run(args).await;
        assert!(r.ok, "kubectl {args:?} failed:\n{}{}", r.stdout, r.stderr);
        r.stdout
    }
}

/// Waits until `check` holds on the store, or panics naming `what`.
pub async fn wait_for(lab: &Lab, what: &str, check: impl Fn(&Lab) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check(lab) {
        assert!(Instant::now() < deadline, "{what}: not after 90 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}
