//! Hosts in network namespaces of their own, on one bridge, and the faults
//! put between them: nftables rules in each host's namespace (this kernel
//! has no `netem`), signals, a small disk, a shifted clock.
//!
//! Layout, for a net of `n` hosts with prefix `P` and subnet `10.77.K.0/24`:
//! a namespace `Psw` holds the bridge; each host's namespace `PhI` holds
//! one end of a veth (address `10.77.K.I`), the other end on the bridge;
//! the test process reaches them through a veth of its own (`10.77.K.254`).
//! Deleting the namespaces deletes every interface made, which `Drop` does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::common::{self, Spawned};

const SECRET: &str = "the fault campaign's cluster secret";
pub const TOKEN: &str = "fault-campaign-token";

/// Runs `ip` (or `nft` through `ip netns exec`), failing the test if it fails.
fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {program}: {e} (iproute2 and nftables are installed by scripts/test.sh)"
            )
        });
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A subnet no other net of this machine uses now.
fn free_subnet() -> u8 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let routes = Command::new("ip")
        .args(["route"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let start = std::process::id() + NEXT.fetch_add(37, Ordering::Relaxed);
    (0..250)
        .map(|i| ((start + i) % 250 + 1) as u8)
        .find(|k| !routes.contains(&format!("10.77.{k}.0/24")))
        .expect("a free 10.77.x.0/24")
}

pub struct Net {
    prefix: String,
    subnet: u8,
    pub hosts: Vec<Host>,
    root: tempfile::TempDir,
    /// The hosts use the NATS cluster in their namespaces for key-value
    /// stores (three replicas).
    nats: bool,
    /// The hosts keep the registry in that NATS cluster
    /// (`--cluster-registry nats`), not on gossip alone.
    pub registry_on_nats: bool,
}

/// One host: its namespace, address, data directory and process.
pub struct Host {
    pub index: usize,
    pub ns: String,
    pub ip: String,
    pub url: String,
    pub dir: PathBuf,
    child: Option<Spawned>,
    /// Started under libfaketime with this shift of its wall clock.
    pub clock_shift: Option<String>,
    /// Its data directory is a tmpfs of this size.
    pub small_disk: Option<&'static str>,
    paused: bool,
    /// A nats-server beside it in its namespace, when the net has NATS.
    nats: Option<Spawned>,
}

impl Net {
    /// `n` hosts, not started yet.
    pub fn new(n: usize) -> Net {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "lf{}{}",
            std::process::id() % 10_000,
            COUNT.fetch_add(1, Ordering::Relaxed) % 10
        );
        let subnet = free_subnet();
        let root = tempfile::tempdir().unwrap();
        let switch = format!("{prefix}sw");
        run("ip", &["netns", "add", &switch]);
        let net = Net {
            prefix: prefix.clone(),
            subnet,
            hosts: Vec::new(),
            root,
            nats: false,
            registry_on_nats: false,
        };
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        );
        run("ip", &["-n", &switch, "link", "set", "br0", "up"]);
        // The test process's own leg.
        let (ra, rb) = (format!("{prefix}ra"), format!("{prefix}rb"));
        run(
            "ip",
            &["link", "add", &ra, "type", "veth", "peer", "name", &rb],
        );
        run("ip", &["link", "set", &rb, "netns", &switch]);
        run(
            "ip",
            &["-n", &switch, "link", "set", &rb, "master", "br0", "up"],
        );
        run(
            "ip",
            &["addr", "add", &format!("10.77.{subnet}.254/24"), "dev", &ra],
        );
        run("ip", &["link", "set", &ra, "up"]);
        let mut net = net;
        for index in 1..=n {
            let ns = format!("{prefix}h{index}");
            run("ip", &["netns", "add", &ns]);
            let (a, b) = (format!("{prefix}h{index}a"), format!("{prefix}h{index}b"));
            run(
                "ip",
                &["link", "add", &a, "type", "veth", "peer", "name", &b],
            );
            run("ip", &["link", "set", &a, "netns", &ns]);
            run("ip", &["link", "set", &b, "netns", &switch]);
            run(
                "ip",
                &["-n", &switch, "link", "set", &b, "master", "br0", "up"],
            );
            let ip = format!("10.77.{subnet}.{index}");
            run(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &a],
            );
            run("ip", &["-n", &ns, "link", "set", &a, "up"]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            nft(&ns, "add table inet faults");
            nft(
                &ns,
                "add chain inet faults input { type filter hook input priority 0 ; }",
            );
            let dir = net.root.path().join(format!("h{index}"));
            std::fs::create_dir_all(&dir).unwrap();
            net.hosts.push(Host {
                index,
                url: format!("http://{ip}:8080"),
                ip,
                ns,
                dir,
                child: None,
                clock_shift: None,
                small_disk: None,
                paused: false,
                nats: None,
            });
        }
        net
    }

    /// The test process's address on the bridge (never dropped by faults).
    pub fn client_ip(&self) -> String {
        format!("10.77.{}.254", self.subnet)
    }

    /// Starts a nats-server in each host's namespace, clustered, JetStream
    /// fsyncing every write; the hosts started after use it.
    pub async fn start_nats(&mut self) {
        let routes: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("nats://{}:6222", h.ip))
            .collect();
        for host in &mut self.hosts {
            let store = host.dir.join("nats");
            let config = host.dir.join("nats.conf");
            std::fs::write(
                &config,
                format!(
                    "jetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n",
                    store.display().to_string()
                ),
            )
            .unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &host.ns])
                .arg(common::nats_server_bin())
                .args(["--config", config.to_str().unwrap()])
                .args(["--addr", &host.ip, "--port", "4222", "--http_port", "8222"])
                .args(["--server_name", &format!("n{}", host.index)])
                .args([
                    "--cluster_name",
                    "faults",
                    "--cluster",
                    &format!("nats://{}:6222", host.ip),
                ])
                .args(["--routes", &routes.join(",")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map(Spawned::new)
                .expect("starting nats-server in its namespace");
            host.nats = Some(child);
        }
        for host in &self.hosts {
            let url = format!("http://{}:8222/healthz?js-enabled-only=true", host.ip);
            until_ok(&format!("n{} is healthy", host.index), &url).await;
        }
        self.nats = true;
    }

    /// Starts host `i` (0-based), joining through host 0.
    pub fn start(&mut self, i: usize) {
        let nats_urls: Vec<String> = if self.nats {
            self.hosts
                .iter()
                .map(|h| format!("nats://{}:4222", h.ip))
                .collect()
        } else {
            Vec::new()
        };
        let seed = format!("{}:7946", self.hosts[0].ip);
        let host = &mut self.hosts[i];
        let data = host.dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        if let Some(size) = host.small_disk
            && !is_mounted(&data)
        {
            run(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size}"),
                    "tmpfs",
                    data.to_str().unwrap(),
                ],
            );
        }
        std::fs::create_dir_all(host.dir.join("policies")).unwrap();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &host.ns]);
        if let Some(shift) = &host.clock_shift {
            // libfaketime preloaded, not through the `faketime` command,
            // which forks: the host must be the process this test kills.
            // The wall clock only: timers (monotonic) keep real time.
            command
                .env("LD_PRELOAD", common::libfaketime())
                .env("FAKETIME", shift)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        command
            .arg(env!("CARGO_BIN_EXE_lichen"))
            .args(["serve", "--listen", &format!("{}:8080", host.ip)])
            .args(["--gossip", &format!("{}:7946", host.ip)])
            .args(["--node-id", &format!("h{}", host.index)])
            .args(["--gossip-interval-ms", "100"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--policies")
            .arg(host.dir.join("policies"))
            .env("LICHEN_ADMIN_TOKEN", TOKEN)
            .env("LICHEN_CLUSTER_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(host.dir.join(format!("log-{}", now_ms())))
                    .map_or(Stdio::null(), Stdio::from),
            );
        if i > 0 {
            command.args(["--peer", &seed]);
        }
        if !nats_urls.is_empty() {
            command.args(["--kv-backend", "nats", "--kv-nats-replicas", "3"]);
            command.args(["--kv-nats-timeout", "5s"]);
            let registry = if self.registry_on_nats {
                "nats"
            } else {
                "gossip"
            };
            command.args(["--cluster-registry", registry]);
            for url in &nats_urls {
                command.args(["--kv-nats-url", url]);
            }
        }
        let child = command
            .spawn()
            .map(Spawned::new)
            .expect("starting lichen serve in its namespace");
        host.child = Some(child);
        host.paused = false;
    }

    /// Starts every host, and waits until each answers.
    pub async fn start_all(&mut self) {
        for i in 0..self.hosts.len() {
            self.start(i);
        }
        for host in &self.hosts {
            host.until_up().await;
        }
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.hosts[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT.
    pub fn pause(&mut self, i: usize, paused: bool) {
        let host = &mut self.hosts[i];
        if let Some(child) = &host.child {
            let signal = if paused { "-STOP" } else { "-CONT" };
            run("kill", &[signal, &child.id().to_string()]);
            host.paused = paused;
        }
    }

    /// Drops what each host receives from the hosts outside its side.
    pub fn partition(&self, sides: &[&[usize]]) {
        for side in sides {
            let others: Vec<String> = (0..self.hosts.len())
                .filter(|i| !side.contains(i))
                .map(|i| self.hosts[i].ip.clone())
                .collect();
            if others.is_empty() {
                continue;
            }
            for &i in *side {
                nft(
                    &self.hosts[i].ns,
                    &format!(
                        "add rule inet faults input ip saddr {{ {} }} drop",
                        others.join(", ")
                    ),
                );
            }
        }
    }

    /// Drops what `to` receives from `from`; the other way works.
    pub fn one_way(&self, from: usize, to: usize) {
        nft(
            &self.hosts[to].ns,
            &format!(
                "add rule inet faults input ip saddr {} drop",
                self.hosts[from].ip
            ),
        );
    }

    /// Drops `percent` of what every host receives from the others.
    pub fn loss(&self, percent: u32) {
        let client = self.client_ip();
        for host in &self.hosts {
            nft(
                &host.ns,
                &format!(
                    "add rule inet faults input ip saddr 10.77.{}.0/24 ip saddr != {client} numgen random mod 100 < {percent} drop",
                    self.subnet
                ),
            );
        }
    }

    /// Removes every network fault.
    pub fn heal(&self) {
        for host in &self.hosts {
            nft(&host.ns, "flush chain inet faults input");
        }
    }

    /// Fills host `i`'s (small) disk; returns the file that does.
    pub fn fill_disk(&self, i: usize) -> PathBuf {
        let filler = self.hosts[i].dir.join("data/filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
        filler
    }

    pub fn live(&self) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|&i| self.hosts[i].child.is_some() && !self.hosts[i].paused)
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            if self.hosts[i].paused {
                self.pause(i, false);
            }
            self.kill(i);
            if let Some(mut nats) = self.hosts[i].nats.take() {
                let _ = nats.kill();
                let _ = nats.wait();
            }
        }
        for host in &self.hosts {
            let data = host.dir.join("data");
            if is_mounted(&data) {
                let _ = Command::new("umount").arg("-l").arg(&data).status();
            }
            let _ = Command::new("ip").args(["netns", "del", &host.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &format!("{}sw", self.prefix)])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}ra", self.prefix)])
            .stderr(Stdio::null())
            .status();
    }
}

impl Host {
    /// Waits until the host answers `/healthz`.
    pub async fn until_up(&self) {
        let url = format!("{}/healthz", self.url);
        until_ok(&format!("h{} answers", self.index), &url).await;
    }

    pub fn log(&self) -> String {
        let mut text = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for path in logs.iter().filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("log-"))
        }) {
            text.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        text
    }
}

/// Waits until `GET url` answers `200`: `what` names it if it never does.
async fn until_ok(what: &str, url: &str) {
    common::eventually(what, || async {
        common::call(
            http::Method::GET,
            url,
            &[],
            Vec::new(),
            Duration::from_secs(2),
        )
        .await
        .is_ok_and(|r| r.status == http::StatusCode::OK)
    })
    .await;
}

fn nft(ns: &str, rule: &str) {
    let args: Vec<&str> = ["netns", "exec", ns, "nft"]
        .into_iter()
        .chain(rule.split(' '))
        .collect();
    run("ip", &args);
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&*path))
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}
