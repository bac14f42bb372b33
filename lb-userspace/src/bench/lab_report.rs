//! The lab's sections of BENCHMARKS.md (end to end, churn and control
//! path) and the end-to-end plot.

use std::fmt::Write as _;

use super::{
    churn,
    e2e::{Figures, Mode, Row},
    plot::{line_chart, Series},
    Results, Stats,
};

fn stat(s: &Stats, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}

fn over_reps(row: &Row, f: impl Fn(&Figures) -> f64) -> Stats {
    Stats::of(&row.reps.iter().map(f).collect::<Vec<_>>())
}

/// Per repetition, `row`'s figure over `base`'s (same repetition).
fn ratio(row: &Row, base: &Row, f: impl Fn(&Figures) -> f64) -> Stats {
    let v: Vec<f64> = row
        .reps
        .iter()
        .zip(&base.reps)
        .map(|(a, b)| f(a) / f(b))
        .collect();
    Stats::of(&v)
}

fn row(r: &Results, mode: Mode, n: usize) -> Option<&Row> {
    r.e2e
        .rows
        .iter()
        .find(|x| x.mode == mode && x.services == n)
}

pub fn end_to_end(o: &mut String, r: &Results) {
    let s = &r.plan.e2e;
    if r.e2e.rows.is_empty() {
        return;
    }
    let _ = writeln!(o, "## End to end in the lab\n");
    let _ = writeln!(
        o,
        "Two labs run side by side on this machine, one node each, with three \
         echo pods, Service `web` in front of them and three client pods: one \
         with the agent (lb), one without it, where rules shaped like \
         kube-proxy's are loaded into the node's network namespace, each \
         rule set taken only by its own client pod, matched by source \
         address (iptables-restore: KUBE-SERVICES, KUBE-SVC-* with \
         `statistic random`, KUBE-SEP-* DNAT; `nft -f`: a `service-ips` verdict \
         map, `numgen random` into endpoint chains). Up to each count, more \
         Services are added through the lab's API, each with one endpoint (an \
         echo pod, so every Service answers); lb programs them from the API, \
         the rules are generated from the same objects.\n"
    );
    let _ = writeln!(
        o,
        "Every request is a new TCP connection (connect, HTTP GET, answer, \
         close) to a Service picked at random among all of them (the same \
         seeded sequence for every mode), so with iptables the Service's \
         rule is anywhere in KUBE-SERVICES, as in a cluster. **First packet** \
         is the time connect() takes: the SYN through the translation, the \
         SYN-ACK back (kube-proxy's nftables proposal measured this as \
         p1/p50/p90/p99). **Request** is connect to answer. Each \
         repetition sends {seq} requests one after another per mode, then \
         runs {w} clients for {d:?} for the rate; the modes run back to back \
         within a repetition, {reps} repetitions. Pod-to-pod traffic (the \
         floor, straight to a pod's address) comes from a third client \
         pod, so its connections never share a 5-tuple with the ClusterIP \
         ones. **Socket LB**: lb's agent lab runs with socket LB on; its \
         requests come from a process of their own (`lb bench-client`) in \
         the second client pod's network namespace and node cgroup, where \
         the cgroup hooks see its sockets (the bench's own client threads \
         are in no pod's cgroup: their ClusterIP connections are translated \
         per packet, the row above); the bench checks that the node's \
         `sock_translated` counter grew by at least as many connections. \
         Figures are the median over repetitions (min–max); ratios are \
         taken per repetition against the floor of the same lab run.\n",
        seq = s.sequential,
        w = s.workers,
        d = s.duration,
        reps = s.repeats
    );
    let _ = writeln!(
        o,
        "| Services | mode | first packet p1 / p50 / p90 / p99 (µs) | request p50 (µs) | request p99 (µs) | requests/s | first-packet p50 ÷ floor | failed |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for &n in s.service_counts {
        let Some(floor) = row(r, Mode::Floor, n) else {
            continue;
        };
        for mode in Mode::ALL {
            let Some(x) = row(r, mode, n) else { continue };
            let fp: Vec<String> = (0..4)
                .map(|q| format!("{:.0}", over_reps(x, |f| f.first_packet[q]).median))
                .collect();
            let _ = writeln!(
                o,
                "| {n} | {} | {} | {} | {} | {} | {} | {} of {} |",
                mode.name(),
                fp.join(" / "),
                stat(&over_reps(x, |f| f.request[0]), 0),
                stat(&over_reps(x, |f| f.request[1]), 0),
                stat(&over_reps(x, |f| f.rps), 0),
                stat(&ratio(x, floor, |f| f.first_packet[1]), 2),
                x.failures,
                x.requests
            );
        }
    }
    let _ = writeln!(o, "\n![first-packet latency](benchmarks-e2e.svg)\n");
    let _ = writeln!(
        o,
        "Time to bring each translation to the count (from the Service count \
         before): lb from the last API write to the agent reporting every \
         frontend programmed; for the rules, one iptables-restore of the \
         whole nat table and one `nft -f` of the whole table (a full sync, \
         one transaction each). Only the kernel's and the tools' part: \
         kube-proxy's own work comes on top. Two departures from \
         kube-proxy's rules, both to keep the tools' own slowness on this \
         machine out of the run (the packets meet the same lookups): \
         kube-proxy restores with --noflush, in which iptables-nft 1.8 here \
         is quadratic (6,000 Services: 8 s against 1 s; 10,000: 26 s \
         against 2.6 s), so the bench replaces the whole nat table; and \
         kube-proxy gives a one-endpoint Service a `numgen random mod 1 \
         vmap {{ }}` too, an anonymous set, where the bench's nftables rules \
         jump straight to the endpoint chain: this kernel names each new \
         anonymous set by scanning every set of the table \
         (`nf_tables_set_alloc_name`), so loading 30,000 of them took \
         5 minutes.\n"
    );
    let _ = writeln!(
        o,
        "| Services | lb (s) | iptables-restore (s) | nft -f (s) |"
    );
    let _ = writeln!(o, "|---|---|---|---|");
    for p in &r.e2e.programming {
        let _ = writeln!(
            o,
            "| {} | {:.2} | {:.2} | {:.2} |",
            p.services,
            p.lb.as_secs_f64(),
            p.iptables.as_secs_f64(),
            p.nftables.as_secs_f64()
        );
    }
    let _ = writeln!(o);
}

pub fn churn(o: &mut String, r: &Results) {
    let (c, s) = (&r.churn, &r.plan.churn);
    if c.rows.is_empty() {
        return;
    }
    let _ = writeln!(o, "## Churn: a new connection per request\n");
    let _ = writeln!(
        o,
        "Two labs run side by side on this machine ({cores} cores, shared by \
         the labs, the clients and the echo pods: the rates are what the \
         whole machine sustains, not a network's), two nodes each, with eight \
         echo pods spread over both nodes behind Service `web` (ClusterIP) \
         and Service `web-np` (NodePort 30080, externalTrafficPolicy \
         Cluster), and two client pods on node 1. One lab runs lb's agent on \
         each node. The other has no agents: each node's nat table holds \
         rules shaped like kube-proxy's iptables mode, loaded with one \
         iptables-restore (PREROUTING → KUBE-SERVICES: each ClusterIP, then, \
         last, `-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`; the node port \
         → KUBE-EXT-*, which marks 0x4000 (KUBE-MARK-MASQ) → KUBE-SVC-* \
         (`statistic random` per endpoint) → KUBE-SEP-* DNAT; POSTROUTING → \
         KUBE-POSTROUTING: unmarked packets return, marked ones are \
         unmarked and get `MASQUERADE --random-fully`), so Linux conntrack \
         does the NAT (nf_conntrack_max {ct_max}, TIME_WAIT 120 s, the \
         kernel's defaults, which kube-proxy leaves; the table is flushed \
         with `conntrack -F` before each mode, as the floor runs through \
         the same nodes).\n",
        cores = c.cores,
        ct_max = c
            .conntrack_max
            .map_or("unknown".to_string(), |n| n.to_string()),
    );
    let _ = writeln!(
        o,
        "Every client opens a new TCP connection per request (connect, HTTP \
         GET, answer, close) and the next one without pause, for {d:?} per \
         mode and path. **NodePort**: {src} clients in the outside namespace, \
         each bound to an address of its own (172.18.0.101 and on), going \
         round node 1's and node 2's address on the node port in turn; \
         the floor is the same clients straight to the eight pods' addresses, \
         routed through their node with nothing translated. **ClusterIP**: \
         {w} clients in the client pod, to the ClusterIP; the floor runs from \
         the second pod on node 1, straight to the pods' addresses (from a \
         pod of its own: a ClusterIP flow from a pod is not SNATed, so from \
         the same pod a floor connection could share its 5-tuple with a \
         ClusterIP one still in TIME_WAIT at the backend). On each path the \
         floor, the iptables shape and lb run one after another, each alone; \
         one run, and the ratios are taken within it, against the floor of \
         the same path. **failed**: requests that met an error (refused, \
         reset, 3 s without an answer, a wrong answer), of all sent. **SYN \
         retransmissions**: TcpExtTCPSynRetrans of the client's namespace \
         over the mode's run (each costs its request at least 1 s). \
         **Request**: connect to the answer's end, of answered requests; \
         requests/s counts answered ones.\n",
        d = s.duration,
        src = s.sources,
        w = s.workers,
    );
    for path in churn::Path::ALL {
        churn_table(o, c, path);
    }
}

fn churn_table(o: &mut String, c: &churn::Results, path: churn::Path) {
    let row = |mode| c.rows.iter().find(|x| x.path == path && x.mode == mode);
    if churn::Mode::ALL.iter().all(|&m| row(m).is_none()) {
        return;
    }
    let _ = writeln!(o, "### {}\n", path.name());
    let _ = writeln!(
        o,
        "| mode | requests/s | failed | client SYN retransmissions | request p50 (ms) | request p99 (ms) | p99 ÷ floor |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    let floor_p99 = row(churn::Mode::Floor).map(|f| f.request_ms[1]);
    for mode in churn::Mode::ALL {
        let Some(x) = row(mode) else { continue };
        let ratio = match floor_p99 {
            Some(f) if f > 0.0 => format!("{:.2}", x.request_ms[1] / f),
            _ => "–".into(),
        };
        let _ = writeln!(
            o,
            "| {} | {:.0} | {} of {} | {} | {:.2} | {:.2} | {ratio} |",
            mode.name(),
            x.rps,
            x.failures,
            x.requests,
            x.syn_retransmissions,
            x.request_ms[0],
            x.request_ms[1]
        );
    }
    if let (Some(lb), Some(ipt)) = (row(churn::Mode::Lb), row(churn::Mode::Iptables)) {
        if ipt.rps > 0.0 {
            let _ = writeln!(
                o,
                "\nlb's rate ÷ the iptables shape's: {:.2}.",
                lb.rps / ipt.rps
            );
        }
    }
    if let Some(lb) = row(churn::Mode::Lb) {
        program_costs(o, lb);
    }
    for x in c.rows.iter().filter(|x| x.path == path && x.failures > 0) {
        let _ = writeln!(
            o,
            "\n{}: first failures: {}",
            x.mode.name(),
            x.first_failures
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(o);
}

/// Which build the agents ran, for the memory figures (its text is part
/// of the resident set).
fn agent_build() -> String {
    match crate::lab::agent_binary() {
        Some(path) => {
            let mb = std::fs::metadata(&path).map_or(0, |m| m.len() >> 20);
            format!(
                "of the build the image ships (`--no-default-features`, {mb} MiB, \
                 `LB_LAB_AGENT_BINARY` as `cargo xtask bench` sets it)"
            )
        }
        None => "of the lab's own build, lab and benchmarks included (`cargo xtask bench` \
                 runs the build the image ships instead)"
            .to_string(),
    }
}

pub fn control(o: &mut String, r: &Results) {
    let c = &r.control;
    if c.sync.is_empty() {
        return;
    }
    let secs: Vec<f64> = c.sync.iter().map(|d| d.as_secs_f64()).collect();
    let (millis, p50, p99) = change_millis(c);
    let _ = writeln!(o, "## Control path\n");
    let _ = writeln!(
        o,
        "A lab without pods: {} Services with {} endpoints each are written to \
         the API first, and the agent starts once the lab's cluster DNS \
         answers for the last Service (the lab has taken them all in); the \
         time is from its start until it reports ready (its maps programmed \
         and its programs attached, `lb_ready`) with every frontend and \
         backend, polled every 10 ms on `/readyz` (a `/metrics` scrape reads \
         the maps), then the counts on `/metrics` ({} runs, each in a new lab). \
         The agent takes the state as streaming lists (`sendInitialEvents`), \
         which the lab serves as Kubernetes 1.32 and 1.34 do. After the last sync, {} changes each \
         take an endpoint from one Service (or give it back) through the API; \
         each is timed from the write until that Service's entry in the \
         node's map has the new backend count (polled every 0.2 ms). Memory \
         is the agent's peak resident set (VmHWM), {}.\n",
        c.services,
        c.endpoints,
        c.sync.len(),
        c.propagation.len(),
        agent_build()
    );
    let _ = writeln!(
        o,
        "Beside it, the same cluster as kube-proxy's nftables mode writes it \
         (`bench::nft_control`), in a namespace of its own: the initial sync \
         is one `nft -f` of the whole table, a change one `nft -f` of \
         kube-proxy's partial sync of that Service (the new endpoint's \
         chain, the Service's chain flushed and written again, a gone \
         endpoint's chain deleted), the burst one `nft -f` of all {} partial \
         syncs; each timed from the spawn of `nft` to its exit. kube-proxy's \
         watch and its minimum sync period (1 s by default) come on top of \
         those, so they are its floor, where lb's figures run from the API \
         write to the map.\n",
        c.burst_len
    );
    let n = &c.nft;
    let nft_secs: Vec<f64> = n.sync.iter().map(|d| d.as_secs_f64()).collect();
    let mut nft_ms: Vec<f64> = n.change.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let (n50, n99) = (
        super::client::quantile(&mut nft_ms, 0.5),
        super::client::quantile(&mut nft_ms, 0.99),
    );
    let ms = |d: Option<std::time::Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    let _ = writeln!(o, "| figure | lb | kube-proxy's nftables shape |");
    let _ = writeln!(o, "|---|---|---|");
    let _ = writeln!(
        o,
        "| initial sync of {} Services × {} endpoints (s) | {} | {} |",
        c.services,
        c.endpoints,
        stat(&Stats::of(&secs), 1),
        stat(&Stats::of(&nft_secs), 1)
    );
    let _ = writeln!(
        o,
        "| one endpoint change: p50 / p99 (ms) | {p50:.1} / {p99:.1} (min {:.1}, max {:.1}) | {n50:.1} / {n99:.1} (min {:.1}, max {:.1}) |",
        millis.first().copied().unwrap_or(f64::NAN),
        millis.last().copied().unwrap_or(f64::NAN),
        nft_ms.first().copied().unwrap_or(f64::NAN),
        nft_ms.last().copied().unwrap_or(f64::NAN)
    );
    let _ = writeln!(
        o,
        "| a burst of {} changes, first write to last in place (ms) | {:.0} | {:.0} |",
        c.burst_len,
        ms(c.burst),
        ms(n.burst)
    );
    let _ = writeln!(
        o,
        "| agent peak memory after the sync (MiB) | {} | |",
        stat(&Stats::of(&c.peak_mib), 0)
    );
    let _ = writeln!(
        o,
        "| agent peak memory after the changes too (MiB) | {:.0} | |\n",
        c.final_peak_mib
    );
    if let Some(large) = &c.large {
        large_control(o, large);
    }
    retained(o, &c.retained);
    policy(o, &c.policy);
}

/// The changes' times in ms, sorted (`quantile` sorts them), with their
/// p50 and p99.
fn change_millis(c: &super::control::Results) -> (Vec<f64>, f64, f64) {
    let mut millis: Vec<f64> = c
        .propagation
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let p50 = super::client::quantile(&mut millis, 0.5);
    let p99 = super::client::quantile(&mut millis, 0.99);
    (millis, p50, p99)
}

/// lb alone at the large Service count.
fn large_control(o: &mut String, c: &super::control::Results) {
    let (millis, p50, p99) = change_millis(c);
    let _ = writeln!(
        o,
        "The same for lb alone at {} Services × {} endpoints (one sync, the \
         agent's service maps sized for them with `--services-map-max` and \
         `--backends-map-max`). The nftables shape is not run at this size: \
         its load grows with the square of the Services on this kernel (each \
         new anonymous set is named by a scan of every set), 165 s at 10,000 \
         and so hours at 100,000.\n",
        c.services, c.endpoints
    );
    let _ = writeln!(o, "| figure | lb |");
    let _ = writeln!(o, "|---|---|");
    let secs: Vec<f64> = c.sync.iter().map(|d| d.as_secs_f64()).collect();
    let _ = writeln!(o, "| initial sync (s) | {} |", stat(&Stats::of(&secs), 1));
    let _ = writeln!(
        o,
        "| one endpoint change: p50 / p99 (ms) | {p50:.1} / {p99:.1} (min {:.1}, max {:.1}) |",
        millis.first().copied().unwrap_or(f64::NAN),
        millis.last().copied().unwrap_or(f64::NAN)
    );
    let _ = writeln!(
        o,
        "| a burst of {} changes, first write to last in place (ms) | {:.0} |",
        c.burst_len,
        c.burst.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    );
    let _ = writeln!(o, "| agent peak memory (MiB) | {:.0} |\n", c.final_peak_mib);
}

/// What the agent keeps per Service, counted by its allocator.
fn retained(o: &mut String, all: &[crate::agent::retained::Retained]) {
    if all.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "What the agent keeps, per Service, counted by its allocator (`agent::retained`: \
         bytes asked for and not freed, the same from run to run, where the peaks above \
         also hold the binary, the programs' load and the allocator's free pages): the \
         agent's own caches, index and writer built in the bench's process from the \
         objects as the API sends them (a ClusterIP with one port, a slice of ready \
         endpoints), the first pass run over them with the map writes discarded, then \
         one endpoint change at a time.\n"
    );
    let _ = writeln!(
        o,
        "| bytes per Service | {} |",
        all.iter()
            .map(|r| format!("{} Services × {} endpoints", r.services, r.endpoints))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(o, "|---|{}", "---|".repeat(all.len()));
    let row =
        |o: &mut String, what: &str, f: &dyn Fn(&crate::agent::retained::Retained) -> usize| {
            let cells: Vec<String> = all
                .iter()
                .map(|r| format!("{:.0}", f(r) as f64 / r.services.max(1) as f64))
                .collect();
            let _ = writeln!(o, "| {what} | {} |", cells.join(" | "));
        };
    row(o, "the Service and EndpointSlice caches", &|r| r.caches);
    row(
        o,
        "kept by the service side after the first pass (index, writer)",
        &|r| r.after_pass,
    );
    row(
        o,
        "the first pass's peak above what was there before it",
        &|r| r.pass_peak,
    );
    row(
        o,
        "kept by the service side after the endpoint changes",
        &|r| r.after_changes,
    );
    row(o, "caches and service side, after the changes", &|r| {
        r.caches + r.after_changes
    });
    let _ = writeln!(o);
}

/// The NetworkPolicy rows of the control path.
fn policy(o: &mut String, p: &super::policy::Results) {
    if p.relabel.is_empty() {
        return;
    }
    let mut millis: Vec<f64> = p.relabel.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let p50 = super::client::quantile(&mut millis, 0.5);
    let p99 = super::client::quantile(&mut millis, 0.99);
    let _ = writeln!(
        o,
        "NetworkPolicy, in a lab of its own: {} pods (API objects on a node \
         outside the lab, so no network namespace is made; every agent \
         programs every pod's endpoint) in {} namespaces, and {} policies, \
         each selecting one `app` value and allowing port 80 from the next. \
         The initial sync is from the agent's start to the last pod's \
         ipcache entry. Then {} pods, one at a time, get an `app` value no \
         other pod has (a new identity, matched against every rule); each \
         is timed from the API write until the pod's ipcache entry has the \
         new identity (the first write of the pass that also rewrites its \
         endpoint's rules).\n",
        p.pods,
        p.namespaces,
        p.policies,
        p.relabel.len()
    );
    let _ = writeln!(o, "| figure | value |");
    let _ = writeln!(o, "|---|---|");
    let _ = writeln!(
        o,
        "| initial sync of {} pods and {} policies (s) | {:.1} |",
        p.pods,
        p.policies,
        p.sync.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "| one pod relabel, API write to ipcache: p50 / p99 (ms) | {p50:.1} / {p99:.1} (min {:.1}, max {:.1}) |\n",
        millis.first().copied().unwrap_or(f64::NAN),
        millis.last().copied().unwrap_or(f64::NAN)
    );
}

/// First-packet p50 and p99 against the Service count, a line per mode.
pub fn plot(r: &Results) -> String {
    let counts = r.plan.e2e.service_counts;
    let mut series = Vec::new();
    for (color, mode) in Mode::ALL.into_iter().enumerate() {
        for (q, name) in [(1, "p50"), (3, "p99")] {
            series.push(Series {
                label: format!("{} {name}", mode.name()),
                points: counts
                    .iter()
                    .map(|&n| row(r, mode, n).map(|x| over_reps(x, |f| f.first_packet[q])))
                    .collect(),
                dashed: q == 3,
                color,
            });
        }
    }
    line_chart(
        "First packet (connect) latency, µs (median over repetitions, min–max)",
        "Services",
        &counts.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        &series,
    )
}

/// lb's programs during its run on a path, as the kernel timed them.
fn program_costs(o: &mut String, lb: &churn::Row) {
    if lb.programs.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nlb's programs, timed by the kernel in a second run of lb a quarter \
         as long ({} requests; `kernel.bpf_stats_enabled`: run_time_ns and \
         run_cnt of every copy on both nodes, before and after; the timing \
         itself adds two clock reads to each run):\n",
        lb.timed_requests
    );
    let _ = writeln!(
        o,
        "| program | runs per request | ns per run | ns per request |"
    );
    let _ = writeln!(o, "|---|---|---|---|");
    let requests = lb.timed_requests.max(1) as f64;
    let mut total = 0.0;
    for p in &lb.programs {
        let per_request = p.run_time_ns as f64 / requests;
        total += per_request;
        let _ = writeln!(
            o,
            "| {} | {:.1} | {:.0} | {:.0} |",
            p.name,
            p.runs as f64 / requests,
            p.ns_per_run(),
            per_request
        );
    }
    let _ = writeln!(o, "| all | | | {total:.0} |");
}
