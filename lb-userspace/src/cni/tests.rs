//! The plugin's protocol and the chaining, on the specification's and
//! kindnet's own documents.

use std::{cell::Cell, path::Path, time::Duration};

use serde_json::{json, Value};

use super::{
    handle, host_interfaces,
    install::{chain, unchain, Entry},
    Code, Env, NetConf,
};

/// What kindnet's ptp plugin returns for a pod: the host veth first, then
/// the container's eth0 with its netns.
fn ptp_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth1a2b3c4d", "mac": "aa:bb:cc:00:00:01"},
            {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/var/run/netns/cni-1234"}
        ],
        "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn conf(extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "kindnet",
        "type": "lb-cni",
        "interfacePrefix": "veth",
        "timeoutSeconds": 0.05,
        "prevResult": ptp_result(),
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn env(command: &str) -> Env {
    Env {
        command: command.to_string(),
        container_id: "c0ffee".to_string(),
    }
}

const PIN_DIR_THERE: &dyn Fn(&Path) -> bool = &|_| true;

#[test]
fn host_interfaces_are_those_without_a_sandbox_and_with_the_prefix() {
    let r = ptp_result();
    assert_eq!(host_interfaces(&r, "veth"), ["veth1a2b3c4d"]);
    assert_eq!(host_interfaces(&r, ""), ["veth1a2b3c4d"]);
    assert!(host_interfaces(&r, "lxc").is_empty());
    assert!(host_interfaces(&json!({}), "").is_empty());
    // An empty sandbox is the host's too (some plugins write "").
    let r = json!({"interfaces": [{"name": "veth9", "sandbox": ""}]});
    assert_eq!(host_interfaces(&r, "veth"), ["veth9"]);
}

#[test]
fn add_returns_the_previous_result_once_the_programs_are_on_the_veth() {
    let looked = Cell::new(0);
    // The agent attaches on the third look.
    let probe = |ifname: &str| {
        assert_eq!(ifname, "veth1a2b3c4d");
        looked.set(looked.get() + 1);
        looked.get() >= 3
    };
    let mut c: Value = serde_json::from_slice(&conf(json!({"timeoutSeconds": 5}))).unwrap();
    c["cniVersion"] = json!("0.4.0");
    let out = handle(
        &env("ADD"),
        &serde_json::to_vec(&c).unwrap(),
        &probe,
        PIN_DIR_THERE,
    )
    .unwrap()
    .unwrap();
    assert_eq!(looked.get(), 3);
    let mut want = ptp_result();
    want["cniVersion"] = json!("0.4.0");
    assert_eq!(out, want);
}

#[test]
fn add_fails_try_again_later_when_the_agent_never_attaches() {
    let started = std::time::Instant::now();
    let err = handle(&env("ADD"), &conf(json!({})), &|_| false, PIN_DIR_THERE).unwrap_err();
    assert_eq!(err.code, Code::TryAgainLater);
    assert!(err.msg.contains("veth1a2b3c4d"), "{}", err.msg);
    assert!(started.elapsed() >= Duration::from_millis(50));
    let out = err.to_json("1.0.0");
    assert_eq!(out["code"], 11);
    assert_eq!(out["cniVersion"], "1.0.0");
}

#[test]
fn check_looks_once_without_waiting() {
    let looked = Cell::new(0);
    let probe = |_: &str| {
        looked.set(looked.get() + 1);
        false
    };
    let c = conf(json!({"timeoutSeconds": 30}));
    let err = handle(&env("CHECK"), &c, &probe, PIN_DIR_THERE).unwrap_err();
    assert_eq!(err.code, Code::TryAgainLater);
    assert_eq!(looked.get(), 1);
    // Programs in place: success, and no result printed (the specification's
    // CHECK prints nothing).
    assert_eq!(
        handle(&env("CHECK"), &c, &|_| true, PIN_DIR_THERE),
        Ok(None)
    );
}

#[test]
fn without_an_agent_on_the_node_the_result_passes_through() {
    let out = handle(&env("ADD"), &conf(json!({})), &|_| false, &|_| false)
        .unwrap()
        .unwrap();
    assert_eq!(out["interfaces"], ptp_result()["interfaces"]);
}

#[test]
fn bad_configurations_get_the_specifications_codes() {
    let cases: [(&[u8], Code); 5] = [
        (b"not json", Code::InvalidConfig),
        (br#"{"cniVersion": "9.9.9", "prevResult": {}}"#, Code::IncompatibleVersion),
        // Not chained: no previous result.
        (br#"{"cniVersion": "1.0.0", "name": "n", "type": "lb-cni"}"#, Code::InvalidConfig),
        // A previous result with no host interface (a plugin that does not
        // report it): said, not waited for in vain.
        (
            br#"{"cniVersion": "1.0.0", "prevResult": {"interfaces": [{"name": "eth0", "sandbox": "/x"}]}}"#,
            Code::InvalidConfig,
        ),
        (
            br#"{"cniVersion": "1.0.0", "prevResult": {"interfaces": "eth0"}}"#,
            Code::InvalidConfig,
        ),
    ];
    for (stdin, code) in cases {
        let err = handle(&env("ADD"), stdin, &|_| true, PIN_DIR_THERE).unwrap_err();
        assert_eq!(
            err.code,
            code,
            "{}: {}",
            String::from_utf8_lossy(stdin),
            err.msg
        );
    }
    let unknown = handle(&env("FROB"), b"{}", &|_| true, PIN_DIR_THERE).unwrap_err();
    assert_eq!(unknown.code, Code::InvalidEnv);
    let vars = std::collections::BTreeMap::new();
    assert_eq!(
        Env::from_vars(&vars).err().map(|e| e.code),
        Some(Code::InvalidEnv)
    );
}

#[test]
fn version_del_and_gc() {
    let v = handle(&env("VERSION"), b"", &|_| false, PIN_DIR_THERE)
        .unwrap()
        .unwrap();
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("0.3.1")));
    // DEL succeeds whatever is there, and prints nothing.
    for cmd in ["DEL", "GC"] {
        assert_eq!(
            handle(&env(cmd), b"garbage", &|_| false, PIN_DIR_THERE),
            Ok(None)
        );
    }
}

#[test]
fn timeout_defaults_and_bad_values() {
    let parse = |t: Value| NetConf::parse(&conf(json!({ "timeoutSeconds": t }))).unwrap();
    assert_eq!(parse(json!(2.5)).timeout(), Duration::from_millis(2500));
    assert_eq!(parse(json!(null)).timeout(), super::DEFAULT_TIMEOUT);
    assert_eq!(parse(json!(-1)).timeout(), super::DEFAULT_TIMEOUT);
}

fn kindnet_conflist() -> Value {
    json!({
        "cniVersion": "0.3.1",
        "name": "kindnet",
        "plugins": [
            {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local"}, "mtu": 1500},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

fn entry() -> Entry {
    Entry {
        interface_prefix: "veth".into(),
        pin_dir: "/sys/fs/bpf/lb".into(),
        timeout_seconds: 10.0,
    }
}

#[test]
fn chaining_appends_once_and_replaces_an_older_entry() {
    let chained = chain(&kindnet_conflist(), &entry()).unwrap().unwrap();
    let plugins = chained["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[0]["type"], "ptp");
    assert_eq!(plugins[2]["type"], "lb-cni");
    assert_eq!(plugins[2]["interfacePrefix"], "veth");
    assert_eq!(chained["name"], "kindnet");
    // Again: nothing to do.
    assert_eq!(chain(&chained, &entry()).unwrap(), None);
    // New settings replace the old entry, still last.
    let mut other = entry();
    other.timeout_seconds = 20.0;
    let again = chain(&chained, &other).unwrap().unwrap();
    let plugins = again["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[2]["timeoutSeconds"], 20.0);
    // Uninstall gives back kindnet's list.
    assert_eq!(unchain(&again).unwrap(), Some(kindnet_conflist()));
    assert_eq!(unchain(&kindnet_conflist()).unwrap(), None);
}

#[test]
fn chaining_refuses_what_is_not_a_plugin_list() {
    let single = json!({"cniVersion": "0.3.1", "name": "n", "type": "bridge"});
    assert!(chain(&single, &entry()).is_err());
    let empty = json!({"cniVersion": "0.3.1", "name": "n", "plugins": []});
    assert!(chain(&empty, &entry()).is_err());
}

#[test]
fn install_writes_the_plugin_and_the_chain_into_the_first_configuration() {
    let dir = tempdir("lbcni-install");
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let first = conf.join("10-kindnet.conflist");
    std::fs::write(&first, kindnet_conflist().to_string()).unwrap();
    std::fs::write(
        conf.join("99-other.conflist"),
        kindnet_conflist().to_string(),
    )
    .unwrap();
    super::install::install(&bin, &conf, &entry()).unwrap();
    super::install::install(&bin, &conf, &entry()).unwrap();
    let got: Value = serde_json::from_slice(&std::fs::read(&first).unwrap()).unwrap();
    assert_eq!(got["plugins"].as_array().unwrap().len(), 3);
    let untouched: Value =
        serde_json::from_slice(&std::fs::read(conf.join("99-other.conflist")).unwrap()).unwrap();
    assert_eq!(untouched, kindnet_conflist());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(bin.join("lb-cni"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    // No temporary file left for a runtime to find.
    let names: Vec<_> = std::fs::read_dir(&conf)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    super::install::uninstall(&conf).unwrap();
    let got: Value = serde_json::from_slice(&std::fs::read(&first).unwrap()).unwrap();
    assert_eq!(got, kindnet_conflist());
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(prefix: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
