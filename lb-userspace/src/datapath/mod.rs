//! Loading the eBPF programs, pinning their maps, attaching them to pod veths.

pub mod attach;
pub mod batch;
pub mod maps;
pub mod policy_maps;
pub mod sizes;
pub mod sock_destroy;
pub mod socket_lb;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use lb_common::{
    conntrack::{SweepItem, SWEEP_BATCH},
    map_names,
};

pub use maps::Maps;
pub use sizes::MapSizes;

/// The eBPF object built by `build.rs` from the `lb-ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Program that sees what a pod sends (tc ingress on its host-side veth).
pub const PROG_FROM_POD: &str = "lb_from_pod";
/// Program that sees what a pod receives (tc egress on its host-side veth).
pub const PROG_TO_POD: &str = "lb_to_pod";
/// XDP program on the node's uplink: traffic from outside the node.
pub const PROG_UPLINK: &str = "lb_uplink";
/// The same as a tc ingress program, for uplinks where XDP copies every
/// packet (`attach::UplinkHook`).
pub const PROG_UPLINK_TC: &str = "lb_uplink_tc";
/// The conntrack sweep's remover: run through BPF_PROG_TEST_RUN, never
/// attached (see `remove_unchanged`).
pub const PROG_CT_SWEEP: &str = "lb_ct_sweep";
/// The socket LB's cgroup hooks (`socket_lb::attach`): IPv4 sockets, and
/// IPv6 sockets with v4-mapped addresses.
pub const PROGS_SOCK: [&str; 8] = [
    "lb_sock_connect4",
    "lb_sock_sendmsg4",
    "lb_sock_recvmsg4",
    "lb_sock_getpeername4",
    "lb_sock_connect6",
    "lb_sock_sendmsg6",
    "lb_sock_recvmsg6",
    "lb_sock_getpeername6",
];

/// The programs and their maps, loaded into the kernel.
pub struct Datapath {
    programs: Programs,
    pub maps: Maps,
    pin_dir: Option<PathBuf>,
    /// The service maps were made by this load (none were pinned): they
    /// are empty, and the first pass need not read them back (a scan of
    /// every bucket of maps sized for the largest cluster).
    fresh_service_maps: bool,
}

impl Datapath {
    /// Loads the programs. With `pin_dir`, maps are pinned there and maps
    /// already pinned there are reused, so an agent restart keeps the state the
    /// data path runs on (conntrack included).
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_with(pin_dir, false, &MapSizes::default())
    }

    /// `load`, with the programs' own log lines (aya-log) on or off (read
    /// them through `logger`), and the cluster-sized maps of `sizes`.
    pub fn load_with(pin_dir: Option<&Path>, bpf_log: bool, sizes: &MapSizes) -> Result<Self> {
        let mut dp = Self::start_load(pin_dir, bpf_log, sizes)?;
        dp.load_rest_in_background()?;
        dp.wait_programs()?;
        Ok(dp)
    }

    /// `load_with`, returning once the maps exist: the programs that serve
    /// packets go on loading on a thread of their own (most of a start is
    /// the verifier's) while the caller fills the maps; the rest wait for
    /// `load_rest_in_background`. Whatever needs a program waits for the
    /// load under way, and fails with its error if it failed.
    pub fn start_load(pin_dir: Option<&Path>, bpf_log: bool, sizes: &MapSizes) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this binary was built with AYA_BUILD_SKIP: it carries no eBPF programs");
        }
        let log_flag = u8::from(bpf_log);
        let mut loader = EbpfLoader::new();
        // The programs make no CO-RE relocations (they read only their
        // context and packets, whose layout is ABI), so the kernel's BTF is
        // not needed: aya would read and parse all of it (5 MB here, 20 MB
        // of parsed types held while the programs load, the agent's peak
        // memory at start) for nothing. The object's own BTF (the maps'
        // types, for bpftool) is still loaded.
        loader.btf(None);
        loader.override_global("LB_LOG", &log_flag, true);
        sizes.apply(&mut loader);
        let mut fresh_service_maps = true;
        if let Some(dir) = pin_dir {
            fresh_service_maps = ![map_names::SERVICES, map_names::BACKENDS]
                .iter()
                .any(|name| dir.join(name).exists());
            ensure_bpffs()?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            sizes.check_pinned(dir)?;
            for name in map_names::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let maps = Maps::take(&mut ebpf)?;
        Ok(Self {
            programs: load_in_background(ebpf, serving())?,
            maps,
            pin_dir: pin_dir.map(Path::to_path_buf),
            fresh_service_maps,
        })
    }

    /// Waits until the programs are loaded (`start_load`).
    pub fn wait_programs(&mut self) -> Result<()> {
        self.loaded().map(|_| ())
    }

    /// Loads the programs `start_load` left out (the conntrack sweep's,
    /// a fifth of the verifier's time at start, first run a sweep period
    /// later) on a thread of their own. Call it once the serving programs
    /// are attached: whatever needs a program meanwhile waits for it.
    pub fn load_rest_in_background(&mut self) -> Result<()> {
        self.loaded()?;
        let Programs::Loaded(ebpf) = std::mem::replace(&mut self.programs, Programs::Failed) else {
            bail!("the thread loading the eBPF programs panicked");
        };
        self.programs = load_in_background(ebpf, vec![(PROG_CT_SWEEP, Kind::Xdp)])?;
        Ok(())
    }

    /// The programs, once loaded.
    fn loaded(&mut self) -> Result<&mut Ebpf> {
        match std::mem::replace(&mut self.programs, Programs::Failed) {
            Programs::Loading(thread) => {
                let (ebpf, loaded) = thread
                    .join()
                    .map_err(|_| anyhow!("the thread loading the programs panicked"))?;
                // Kept either way: the programs that did load still serve.
                self.programs = Programs::Loaded(ebpf);
                loaded?;
            }
            done => self.programs = done,
        }
        match &mut self.programs {
            Programs::Loaded(ebpf) => Ok(ebpf),
            _ => bail!("the thread loading the eBPF programs panicked"),
        }
    }

    /// Reads the programs' log records (written only when loaded with
    /// `bpf_log`) into `logger`; call `flush` when its fd is readable.
    pub fn logger<T: log::Log>(&mut self, logger: T) -> Result<aya_log::EbpfLogger<T>> {
        aya_log::EbpfLogger::init_with_logger(self.loaded()?, logger)
            .context("opening the eBPF log buffer")
    }

    pub fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .loaded()?
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
    }

    /// The empty tc program (the benchmarks' floor), loaded on first use.
    pub fn floor_tc(&mut self) -> Result<&mut SchedClassifier> {
        self.bench_tc("bench_empty_tc")
    }

    /// A tc program only the benchmarks run (the floor, the cost probes),
    /// loaded on first use.
    pub fn bench_tc(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let prog: &mut SchedClassifier = self
            .loaded()?
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        if prog.fd().is_err() {
            load_retrying(name, || prog.load())?;
        }
        Ok(prog)
    }

    /// The empty XDP program (the benchmarks' floor), loaded on first use.
    pub fn floor_xdp(&mut self) -> Result<&mut aya::programs::Xdp> {
        let prog: &mut aya::programs::Xdp = self
            .loaded()?
            .program_mut("bench_empty_xdp")
            .context("program bench_empty_xdp missing")?
            .try_into()?;
        if prog.fd().is_err() {
            load_retrying("bench_empty_xdp", || prog.load())?;
        }
        Ok(prog)
    }

    /// One of the socket LB's programs (`PROGS_SOCK`).
    pub fn sock_program(&mut self, name: &str) -> Result<&mut aya::programs::CgroupSockAddr> {
        Ok(self
            .loaded()?
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
    }

    pub fn xdp(&mut self) -> Result<&mut aya::programs::Xdp> {
        Ok(self
            .loaded()?
            .program_mut(PROG_UPLINK)
            .context("program lb_uplink missing")?
            .try_into()?)
    }

    /// Removes the conntrack entries of `items` that are unchanged since
    /// they were listed (same `last_seen_ns`), in the kernel (`lb_ct_sweep`),
    /// and sets each item's `outcome` (`lb_common::conntrack::SWEEP_*`).
    pub fn remove_unchanged(&mut self, items: &mut [SweepItem]) -> Result<()> {
        let prog: &mut aya::programs::Xdp = self
            .loaded()?
            .program_mut(PROG_CT_SWEEP)
            .context("program lb_ct_sweep missing")?
            .try_into()?;
        let mut out = vec![0u8; SWEEP_BATCH * std::mem::size_of::<SweepItem>()];
        for batch in items.chunks_mut(SWEEP_BATCH) {
            let input: &[u8] = bytemuck::cast_slice(batch);
            let out = &mut out[..input.len()];
            prog.test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut *out),
                repeat: 1,
                ..Default::default()
            })
            .context("running lb_ct_sweep")?;
            for (item, done) in batch
                .iter_mut()
                .zip(out.chunks_exact(std::mem::size_of::<SweepItem>()))
            {
                *item = bytemuck::pod_read_unaligned(done);
            }
        }
        Ok(())
    }

    /// Whether the service maps are known empty because this load made
    /// them; true once only (after the first pass they hold what it wrote).
    pub fn take_fresh_service_maps(&mut self) -> bool {
        std::mem::take(&mut self.fresh_service_maps)
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The two programs with the direction each is attached in.
    pub fn attachments() -> [(&'static str, TcAttachType); 2] {
        [
            (PROG_FROM_POD, TcAttachType::Ingress),
            (PROG_TO_POD, TcAttachType::Egress),
        ]
    }
}

/// Where a `Datapath`'s programs are.
enum Programs {
    /// On a thread of their own (`start_load`, `load_rest_in_background`);
    /// it hands the object back with how its loads went.
    Loading(std::thread::JoinHandle<(Ebpf, Result<()>)>),
    Loaded(Ebpf),
    /// The loading thread panicked, and took the object with it.
    Failed,
}

/// A program's type, as its load needs it.
#[derive(Clone, Copy)]
enum Kind {
    Tc,
    Xdp,
    SockAddr,
}

/// The programs that serve packets and sockets: what `start_load` loads
/// before anything is attached.
fn serving() -> Vec<(&'static str, Kind)> {
    let tc = [PROG_FROM_POD, PROG_TO_POD, PROG_UPLINK_TC].map(|p| (p, Kind::Tc));
    let sock = PROGS_SOCK.map(|p| (p, Kind::SockAddr));
    [&tc[..], &[(PROG_UPLINK, Kind::Xdp)], &sock[..]].concat()
}

/// Loads `programs` of the object into the kernel (the verifier's work),
/// up to the first that fails, on a thread of its own that hands the
/// object back with how the loads went.
fn load_in_background(mut ebpf: Ebpf, programs: Vec<(&'static str, Kind)>) -> Result<Programs> {
    let thread = std::thread::Builder::new()
        .name("lb-load".into())
        .spawn(move || {
            yield_to_the_agent();
            let loaded = load_each(&mut ebpf, &programs);
            (ebpf, loaded)
        })
        .context("starting the thread that loads the programs")?;
    Ok(Programs::Loading(thread))
}

/// The verifier's work runs at the lowest priority (nice 19, this thread
/// only): it takes what the listing and the first pass leave of the CPU,
/// and still ends before that pass (a quarter of a second of a core at
/// 10,000 Services). A pod's agent competes only with itself: a cgroup's
/// share of the CPU is not changed by the nice values inside it.
fn yield_to_the_agent() {
    // SAFETY: a plain system call on this thread's own id.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if rc != 0 {
        tracing::debug!(
            "program loading at normal priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn load_each(ebpf: &mut Ebpf, programs: &[(&str, Kind)]) -> Result<()> {
    for &(name, kind) in programs {
        let prog = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?;
        match kind {
            Kind::Tc => {
                let tc: &mut SchedClassifier = prog.try_into()?;
                load_retrying(name, || tc.load())?;
            }
            Kind::Xdp => {
                let xdp: &mut aya::programs::Xdp = prog.try_into()?;
                load_retrying(name, || xdp.load())?;
            }
            Kind::SockAddr => {
                let sock: &mut aya::programs::CgroupSockAddr = prog.try_into()?;
                load_retrying(name, || sock.load())?;
            }
        }
    }
    Ok(())
}

/// Loads a program (`load`), again when the verifier gave up with EAGAIN:
/// it does when a signal is pending for the loading thread (`do_check` in
/// kernel/bpf/verifier.c), such as a SIGCHLD for a child process that
/// exited, caught by tokio's handler in a process that runs children (the
/// test suite's labs: `bench_rules` failed so once in CI). libbpf retries
/// the same way.
fn load_retrying(
    name: &str,
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<()> {
    const TRIES: usize = 5;
    for _ in 1..TRIES {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) =>
            {
                tracing::debug!("loading {name}: verifier interrupted by a signal; again");
            }
            r => return r.with_context(|| format!("verifier rejected {name}")),
        }
    }
    load().with_context(|| format!("verifier rejected {name} ({TRIES} tries)"))
}

/// Mounts bpffs on /sys/fs/bpf unless it is there already.
pub fn ensure_bpffs() -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = Path::new("/sys/fs/bpf");
    if let Ok(st) = nix::sys::statfs::statfs(path) {
        if st.filesystem_type().0 == BPF_FS_MAGIC {
            return Ok(());
        }
    }
    std::fs::create_dir_all(path)?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs on /sys/fs/bpf")?;
    Ok(())
}
