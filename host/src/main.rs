//! The `lichen` command: `serve` runs a host; `deploy`, `ls`, `rm`,
//! `rollback` and `map` talk to one.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// mimalloc instead of the system allocator: a host makes and drops a store,
/// its tables and its request state per request. Measured with wrk -t1 -c64
/// -d8s, three alternating rounds, medians (`bench/NOTES.md`): WASIp3 hello
/// with instance reuse 23,021 -> 26,029 req/s (+13%), WASIp2 hello with a
/// fresh instance per request 22,766 -> 23,486 (+3%).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use lichen::client::{self, Target};
use lichen::server::{self, KvConfig, ServeConfig, Server};

#[derive(Parser)]
#[command(
    name = "lichen",
    version,
    about = "A WebAssembly function host for the edge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a host.
    Serve(Box<ServeArgs>),
    /// Upload a component as function NAME (a new version if it exists),
    /// or have the host pull it from an OCI registry (--oci).
    Deploy {
        name: String,
        #[arg(required_unless_present = "oci")]
        file: Option<PathBuf>,
        /// Pull the component from this reference instead
        /// (REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]); the host must allow
        /// the registry.
        #[arg(long, value_name = "REF", conflicts_with = "file")]
        oci: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// List the deployed functions.
    Ls {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Delete function NAME.
    Rm {
        name: String,
        /// Also delete the function's key-value data on that host (kept by
        /// default, for a redeploy to find).
        #[arg(long)]
        purge_kv: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Make an earlier version of NAME active again (on every peer too):
    /// VERSION, or the one before the active version.
    Rollback {
        name: String,
        version: Option<u64>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Make the certificates for mutual TLS between peers (`--peer-mtls`):
    /// a CA for the cluster, and each host's certificate under it.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Set, list and remove secrets: values a policy's [config] names
    /// (`key = { secret = "NAME" }`), kept encrypted by the host.
    Secret {
        #[command(subcommand)]
        action: SecretAction,
    },
    /// Make, list and revoke scoped API tokens: credentials for a team or
    /// a pipeline that can do what their scopes say and nothing else.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Check the audit log of a data directory, on the host's machine.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Invoke NAME once per element of the JSON array in FILE (in parallel,
    /// across the cluster); prints the results in input order.
    Map {
        name: String,
        file: PathBuf,
        /// The path each element is POSTed to.
        #[arg(long, default_value = "/")]
        path: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Fit a linear model by gradient descent over the cluster, with the
    /// functions/linreg example: load a synthetic data set (made from a
    /// known theta and a seed) as shards into its key-value store, then run
    /// each step as one map over the shards; only theta and gradients
    /// travel. Prints each step's loss and theta, then the distance to the
    /// true theta.
    Train {
        #[command(flatten)]
        settings: lichen::train::Settings,
        /// Print the whole run as JSON at the end instead of a line per step.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
}

#[derive(clap::Args)]
#[command(
    after_help = "Every flag can also be set by the environment variable LICHEN_<FLAG> \
(LICHEN_MAX_UPLOAD_BYTES) and by a key of the --config file (max_upload_bytes = ...); \
a flag wins over the environment, the environment over the file."
)]
struct ServeArgs {
    /// A TOML file of settings: each key a flag's name with `_` for `-`.
    #[arg(long, value_name = "FILE", env = "LICHEN_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where modules, compiled code and the admin token are kept.
    #[arg(long, default_value = "./lichen-data")]
    data_dir: PathBuf,
    /// Directory of per-function policy files.
    #[arg(long, default_value = "./policies")]
    policies: PathBuf,
    /// Admin token; if unset, one is generated into DATA_DIR/admin-token.
    #[arg(long, env = "LICHEN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Read the admin token from this file (kept out of argv and the
    /// environment).
    #[arg(long, value_name = "FILE", conflicts_with = "admin_token")]
    admin_token_file: Option<PathBuf>,
    /// The key secrets are sealed with at rest: 64 hex digits (`openssl rand
    /// -hex 32`). Without it one is generated into DATA_DIR/secrets.key.
    #[arg(long, value_name = "FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Largest component upload, in bytes.
    #[arg(long, default_value_t = server::DEFAULT_MAX_UPLOAD)]
    max_upload_bytes: u64,
    /// Open connections at once; beyond it new ones get 503.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: u32,
    /// Invocations running at once across all functions; beyond it 503.
    #[arg(long, default_value_t = server::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: u32,
    /// Functions whose compiled code stays loaded (least recently called unload first).
    #[arg(long, default_value_t = server::DEFAULT_MAX_LOADED_FUNCTIONS)]
    max_loaded_functions: usize,
    /// Require the admin token for GET /metrics.
    #[arg(long)]
    metrics_require_token: bool,
    /// Serve the status page at /ui (it asks for the admin token).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    ui: bool,
    /// After SIGTERM, keep serving this long with /readyz answering 503, so
    /// load balancers move traffic away; then stop accepting and let
    /// requests in flight finish.
    #[arg(long, default_value = "5s", value_parser = duration)]
    drain: std::time::Duration,
    /// The most memory a policy written by a scoped token may give a
    /// function (the admin token is not bound by the --scoped-max-* ceilings).
    #[arg(long, default_value = "256MiB", value_parser = byte_size, value_name = "SIZE")]
    scoped_max_memory: u64,
    /// The longest deadline a scoped token's policy may set.
    #[arg(long, default_value = "60s", value_parser = duration)]
    scoped_max_timeout: std::time::Duration,
    /// The most concurrent invocations (and per-instance concurrency) a
    /// scoped token's policy may set.
    #[arg(long, default_value_t = 64)]
    scoped_max_concurrency: u32,
    /// The longest admission queue a scoped token's policy may set.
    #[arg(long, default_value_t = 256)]
    scoped_max_queue: u32,
    /// The most instances (`[instances] max`) a scoped token's policy may set.
    #[arg(long, default_value_t = 64)]
    scoped_max_instances: u32,
    /// The largest request or response body a scoped token's policy may allow.
    #[arg(long, default_value = "16MiB", value_parser = byte_size, value_name = "SIZE")]
    scoped_max_body: u64,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    kv: KvArgs,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    /// Reloaded on SIGHUP and when the file changes.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A directory of NAME.crt and NAME.key pairs, one per domain (NAME may
    /// be `*.example.com`), chosen by the name a client asks for (SNI) and
    /// reloaded on change; --tls-cert and --tls-key are the default pair.
    #[arg(long, value_name = "DIR", requires = "tls_cert")]
    tls_dir: Option<PathBuf>,
    /// With --tls-dir: a client asking for a name without a pair there gets
    /// a failed handshake rather than the default certificate.
    #[arg(long, requires = "tls_dir")]
    tls_strict_sni: bool,
    /// Resolve NAME to IP for guests' outbound requests, instead of DNS
    /// (as curl's --resolve); repeatable, several IPs per name allowed.
    #[arg(long = "resolve", value_name = "NAME=IP")]
    resolve: Vec<String>,
    /// A CA certificate (PEM) guests' outbound HTTPS trusts beside the
    /// public roots.
    #[arg(long, value_name = "FILE")]
    outbound_ca: Option<PathBuf>,
    /// A new outbound connection per request, closed after it: the
    /// benchmark's baseline for the pool.
    #[arg(long, hide = true)]
    outbound_no_keep_alive: bool,
    /// Export traces of invocations over OTLP/HTTP (protobuf) to this
    /// collector, e.g. http://127.0.0.1:4318 (`/v1/traces` is added).
    /// Without it nothing is traced.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// A header sent with each export, e.g. `x-api-key=SECRET`; repeatable.
    #[arg(long, value_name = "NAME=VALUE", requires = "otlp_endpoint")]
    otlp_header: Vec<String>,
    /// The share of traces started here that are exported, 0 to 1; a
    /// request with a `traceparent` follows its caller's decision.
    #[arg(long, value_name = "RATIO", default_value_t = 1.0)]
    trace_sampling: f64,
    /// Follow a client's `traceparent` sampled flag (by default only a
    /// signed peer's is followed, and the ratio decides for clients).
    #[arg(long)]
    trace_trust_client: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Deploys from OCI registries (`PUT /v1/functions/NAME` with
/// `{"oci": "REF"}`, `lichen deploy NAME --oci REF`).
#[derive(clap::Args)]
#[command(next_help_heading = "OCI registries")]
struct RegistryArgs {
    /// A registry (HOST[:PORT]) deploys may pull from; repeatable. None:
    /// deploys from registries are refused.
    #[arg(long = "allow-registry", value_name = "HOST[:PORT]")]
    allow_registries: Vec<String>,
    /// A registry (HOST:PORT) spoken to over plain HTTP; repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Refuse references without a digest (REF@sha256:...).
    #[arg(long)]
    require_digest: bool,
    /// Registry credentials: a Docker config.json (`auths`).
    #[arg(long, value_name = "FILE")]
    registry_auth: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for registries, beside the public
    /// roots.
    #[arg(long, value_name = "FILE")]
    registry_ca: Option<PathBuf>,
}

/// Where functions' key-value stores live.
#[derive(clap::Args)]
#[command(next_help_heading = "Key-value stores")]
struct KvArgs {
    /// `local`: an embedded store in DATA_DIR (each host its own data);
    /// `nats`: NATS JetStream, shared by every host on the same NATS cluster.
    #[arg(long, value_enum, default_value_t = KvBackendArg::Local)]
    kv_backend: KvBackendArg,
    /// A NATS server of the site's cluster (with `--kv-backend nats`); repeatable.
    #[arg(long = "kv-nats-url", value_name = "URL")]
    kv_nats_urls: Vec<String>,
    /// Copies NATS keeps of each store (3 survives the loss of one server).
    #[arg(long, default_value_t = 3)]
    kv_nats_replicas: usize,
    /// How long one JetStream request may take before the key-value
    /// operation fails (the guest gets the interface's error).
    #[arg(long, default_value = "5s", value_parser = duration)]
    kv_nats_timeout: std::time::Duration,
    /// A NATS credentials file (JWT and nkey seed, as `nsc` writes it).
    #[arg(long, value_name = "FILE")]
    kv_nats_creds: Option<PathBuf>,
    /// A file holding the NATS user's nkey seed (`SU...`).
    #[arg(long, value_name = "FILE", conflicts_with = "kv_nats_creds")]
    kv_nats_nkey: Option<PathBuf>,
    /// The CA (PEM) NATS's certificate must chain to; TLS is required then.
    #[arg(long, value_name = "FILE")]
    kv_nats_ca: Option<PathBuf>,
    /// A client certificate (PEM) for NATS servers that verify clients.
    #[arg(long, value_name = "FILE", requires = "kv_nats_key")]
    kv_nats_cert: Option<PathBuf>,
    /// The private key (PEM) of --kv-nats-cert.
    #[arg(long, value_name = "FILE", requires = "kv_nats_cert")]
    kv_nats_key: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum KvBackendArg {
    Local,
    Nats,
}

impl KvArgs {
    fn config(self) -> anyhow::Result<KvConfig> {
        match self.kv_backend {
            KvBackendArg::Local => {
                if !self.kv_nats_urls.is_empty() {
                    anyhow::bail!("--kv-nats-url needs --kv-backend nats");
                }
                Ok(KvConfig::Local)
            }
            KvBackendArg::Nats => {
                if self.kv_nats_urls.is_empty() {
                    anyhow::bail!("--kv-backend nats needs at least one --kv-nats-url");
                }
                Ok(KvConfig::Nats {
                    urls: self.kv_nats_urls,
                    replicas: self.kv_nats_replicas,
                    timeout: self.kv_nats_timeout,
                })
            }
        }
    }
}

/// Joining peer hosts. Any of these flags makes the host a cluster member;
/// `--cluster-secret` is then required.
#[derive(clap::Args)]
#[command(next_help_heading = "Cluster")]
struct ClusterArgs {
    /// A host to join through: its gossip address (UDP) or a DNS name that
    /// resolves to such hosts (resolved again every minute), port 7946 if
    /// none is given; repeatable.
    #[arg(long = "peer", value_name = "HOST[:PORT]", value_parser = peer_address)]
    peers: Vec<String>,
    /// Where this host gossips (UDP) [default: the listen IP, port 7946].
    #[arg(long, value_name = "ADDR")]
    gossip: Option<SocketAddr>,
    /// The HTTP address peers use for this host (default: the listen address).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<SocketAddr>,
    /// This host's name in the cluster (default: the hostname and gossip port).
    #[arg(long)]
    node_id: Option<String>,
    /// Shared by every host of the cluster (at least 16 characters).
    #[arg(long, env = "LICHEN_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Read the cluster secret from this file.
    #[arg(long, value_name = "FILE", conflicts_with = "cluster_secret")]
    cluster_secret_file: Option<PathBuf>,
    /// During a rotation, the secret being replaced: gossip and peer
    /// requests under it are accepted too (this host sends under
    /// --cluster-secret). Drop it once every host has the new secret.
    #[arg(long, env = "LICHEN_CLUSTER_SECRET_PREVIOUS", hide_env_values = true)]
    cluster_secret_previous: Option<String>,
    /// Read the previous cluster secret from this file.
    #[arg(long, value_name = "FILE", conflicts_with = "cluster_secret_previous")]
    cluster_secret_previous_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign peers' HTTPS certificates (default:
    /// the chain of this host's --tls-cert). Peers talk HTTPS to a host
    /// that serves TLS.
    #[arg(long, value_name = "FILE")]
    peer_ca: Option<PathBuf>,
    /// Mutual TLS between peers: this host asks every connection for a
    /// certificate of the cluster's CA (--peer-ca, which must sign for this
    /// cluster only) and takes peer requests only over connections that
    /// presented one, and talks to peers over HTTPS only; clients need
    /// none. It presents its --tls-cert to peers that ask.
    #[arg(long, requires_all = ["tls_cert", "peer_ca"])]
    peer_mtls: bool,
    /// A registry entry, secret or token stamped further ahead of this
    /// host's clock is refused and counted, never adopted (a host whose
    /// clock runs ahead cannot drag the cluster's clocks with it).
    #[arg(long, default_value = "60s", value_parser = duration)]
    max_clock_ahead: std::time::Duration,
    /// Time between gossip rounds, in milliseconds; a dead peer is noticed
    /// after about ten.
    #[arg(long, default_value_t = 200)]
    gossip_interval_ms: u64,
    /// Where the registry of functions lives: `gossip`, on the hosts only;
    /// `nats`, in the NATS cluster of `--kv-backend nats` (changes of one
    /// function totally ordered by its log) [default: nats with
    /// `--kv-backend nats`, else gossip].
    #[arg(long, value_enum, value_name = "WHERE")]
    cluster_registry: Option<RegistryArg>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RegistryArg {
    Gossip,
    Nats,
}

impl ClusterArgs {
    fn config(
        self,
        listen: SocketAddr,
        kv: &KvConfig,
    ) -> anyhow::Result<Option<lichen::cluster::ClusterConfig>> {
        let kv_on_nats = matches!(kv, KvConfig::Nats { .. });
        if self.peers.is_empty() && self.gossip.is_none() {
            if self.cluster_registry.is_some() {
                anyhow::bail!("--cluster-registry needs a cluster (--peer or --gossip)");
            }
            if self.peer_mtls {
                anyhow::bail!("--peer-mtls needs a cluster (--peer or --gossip)");
            }
            return Ok(None);
        }
        let shared_registry = match self.cluster_registry {
            None => kv_on_nats,
            Some(RegistryArg::Gossip) => false,
            Some(RegistryArg::Nats) if kv_on_nats => true,
            Some(RegistryArg::Nats) => anyhow::bail!(
                "--cluster-registry nats needs --kv-backend nats (the registry lives in the same NATS cluster)"
            ),
        };
        let secret = match (self.cluster_secret, self.cluster_secret_file) {
            (Some(secret), _) => secret,
            (None, Some(file)) => secret_from(&file)?,
            (None, None) => anyhow::bail!(
                "joining a cluster needs --cluster-secret or --cluster-secret-file (or LICHEN_CLUSTER_SECRET)"
            ),
        };
        let previous = match (
            self.cluster_secret_previous,
            self.cluster_secret_previous_file,
        ) {
            (Some(secret), _) => Some(secret),
            (None, Some(file)) => Some(secret_from(&file)?),
            (None, None) => None,
        };
        let keyring = lichen::cluster::Keyring::new(
            lichen::cluster::Secret::new(&secret)?,
            previous
                .as_deref()
                .map(lichen::cluster::Secret::new)
                .transpose()
                .map_err(|e| e.context("--cluster-secret-previous"))?,
        );
        let gossip_listen = self.gossip.unwrap_or_else(|| {
            SocketAddr::new(listen.ip(), lichen_core::gossip::DEFAULT_GOSSIP_PORT)
        });
        let node_id = match self.node_id {
            Some(id) => id,
            None => {
                let host = std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "lichen".to_string());
                format!("{host}-{}", gossip_listen.port())
            }
        };
        Ok(Some(lichen::cluster::ClusterConfig {
            node_id,
            gossip_listen,
            gossip_advertise: None,
            api_advertise: self.advertise,
            seeds: self.peers,
            keyring: std::sync::Arc::new(keyring),
            peer_ca: self.peer_ca,
            gossip_interval: std::time::Duration::from_millis(self.gossip_interval_ms.max(10)),
            max_clock_ahead: self.max_clock_ahead,
            shared_registry,
        }))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct TargetArgs {
    /// The host to talk to.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Admin token (default: $LICHEN_ADMIN_TOKEN, then DATA_DIR/admin-token).
    #[arg(long, env = "LICHEN_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The local host's data directory, to read its admin token from.
    #[arg(long, default_value = "./lichen-data")]
    data_dir: PathBuf,
    /// A CA certificate (PEM) to trust for an https:// URL, beside the
    /// public roots: for a host whose certificate a private CA signed.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
}

impl TargetArgs {
    fn resolve(self) -> anyhow::Result<Target> {
        let mut target = Target::resolve(self.url, self.token, &self.data_dir)?;
        target.ca_cert = self.ca_cert;
        Ok(target)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A secret kept in a file: its text, without the trailing newline editors
/// add.
fn secret_from(file: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        anyhow::bail!("{} is empty", file.display());
    }
    Ok(secret)
}

/// The command line, with `serve`'s flags given their `LICHEN_*` variables
/// and the config file's values (see `lichen::config`).
fn parse() -> anyhow::Result<Cli> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut command = Cli::command();
    if args.get(1).is_some_and(|a| a == "serve") {
        let file = lichen::config::config_path(&args);
        let mut failed = None;
        command = command.mut_subcommand("serve", |serve| {
            // The file's values are checked before the variables exist, so
            // a variable's bad value is never blamed on the file.
            let serve = match file {
                Some(file) => match lichen::config::with_file(serve.clone(), &file) {
                    Ok(serve) => serve,
                    Err(error) => {
                        failed = Some(error);
                        serve
                    }
                },
                None => serve,
            };
            lichen::config::with_env(serve)
        });
        if let Some(error) = failed {
            return Err(error);
        }
    }
    let matches = command.get_matches_from(args);
    Cli::from_arg_matches(&matches).map_err(|e| e.exit())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(error) => {
            eprintln!("lichen: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Deploy {
            name,
            file,
            oci,
            target,
        } => {
            print(async {
                let target = target.resolve()?;
                match (file, oci) {
                    (_, Some(reference)) => client::deploy_oci(&target, &name, &reference).await,
                    (Some(file), None) => client::deploy(&target, &name, &file).await,
                    (None, None) => anyhow::bail!("give a FILE or --oci REF"),
                }
            })
            .await
        }
        Command::Ls { target } => print(async { client::list(&target.resolve()?).await }).await,
        Command::Secret { action } => match action {
            SecretAction::Set {
                name,
                from_file,
                target,
            } => {
                print(async {
                    let value = secret_value(from_file.as_deref())?;
                    client::secret_set(&target.resolve()?, &name, value).await
                })
                .await
            }
            SecretAction::Ls { target } => {
                print(async { client::secret_list(&target.resolve()?).await }).await
            }
            SecretAction::Rm { name, target } => {
                print(async { client::secret_remove(&target.resolve()?, &name).await }).await
            }
        },
        Command::Cluster { action } => match action {
            ClusterAction::Ca { out, name, days } => {
                print(async {
                    let written = lichen::certs::make_ca(&out, &name, days)?;
                    Ok(format!(
                        "wrote {} (give it to every host as --peer-ca) and {} (keep it off the hosts)",
                        written.cert.display(),
                        written.key.display()
                    ))
                })
                .await
            }
            ClusterAction::Cert {
                name,
                ca,
                addresses,
                out,
                days,
            } => {
                print(async {
                    let written = lichen::certs::make_cert(&ca, &name, &addresses, &out, days)?;
                    Ok(format!(
                        "wrote {} and {}: serve with --tls-cert {} --tls-key {} --peer-mtls",
                        written.cert.display(),
                        written.key.display(),
                        written.cert.display(),
                        written.key.display()
                    ))
                })
                .await
            }
        },
        Command::Audit {
            action: AuditAction::Verify { data_dir },
        } => {
            print(async {
                let verified = lichen::audit::verify(&data_dir)?;
                Ok(format!(
                    "the audit log's chain holds: {} lines in {} files ({} older lines before it); its newest line's hash is {} (keep it elsewhere: a log cut short shows against it)",
                    verified.lines,
                    verified.files,
                    verified.unchained,
                    verified.head.as_deref().unwrap_or("none")
                ))
            })
            .await
        }
        Command::Token { action } => match action {
            TokenAction::Create {
                name,
                scopes,
                expires_in,
                target,
            } => {
                print(async {
                    client::token_create(&target.resolve()?, &name, &scopes, expires_in).await
                })
                .await
            }
            TokenAction::Ls { target } => {
                print(async { client::token_list(&target.resolve()?).await }).await
            }
            TokenAction::Revoke { name, target } => {
                print(async { client::token_revoke(&target.resolve()?, &name).await }).await
            }
        },
        Command::Rm {
            name,
            purge_kv,
            target,
        } => print(async { client::remove(&target.resolve()?, &name, purge_kv).await }).await,
        Command::Rollback {
            name,
            version,
            target,
        } => print(async { client::rollback(&target.resolve()?, &name, version).await }).await,
        Command::Map {
            name,
            file,
            path,
            target,
        } => print(async { client::map(&target.resolve()?, &name, &file, &path).await }).await,
        Command::Train {
            settings,
            json,
            target,
        } => {
            print(async {
                let target = target.resolve()?;
                let outcome = lichen::train::train(&target, &settings, |step| {
                    if !json {
                        println!("{}", lichen::train::step_line(step));
                    }
                })
                .await?;
                Ok(if json {
                    serde_json::to_string_pretty(&outcome)?
                } else {
                    lichen::train::summary(&outcome)
                })
            })
            .await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lichen: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum SecretAction {
    /// Set secret NAME to the UTF-8 text on standard input (or in
    /// --from-file), so it never appears in argv or the shell's history;
    /// trailing newlines are dropped.
    Set {
        name: String,
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// List the secrets: name, digest, when set (never values).
    Ls {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Remove secret NAME (refused while a policy names it).
    Rm {
        name: String,
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// What `lichen cluster` does.
#[derive(Subcommand)]
enum ClusterAction {
    /// Make a CA for the cluster: DIR/ca.crt (give it to every host as
    /// --peer-ca) and DIR/ca.key (keep it off the hosts).
    Ca {
        /// Where to write; nothing there is overwritten.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The CA's name in its certificate.
        #[arg(long, default_value = "Lichen cluster CA")]
        name: String,
        /// How many days it is good for.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Make host NAME's certificate under the CA in --ca: NAME.crt (its
    /// certificate, then the CA's) and NAME.key, for --tls-cert and
    /// --tls-key; it serves clients and peers and is presented to peers.
    Cert {
        name: String,
        /// The directory `lichen cluster ca` wrote.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// An IP address or DNS name the host is reached by; repeatable.
        #[arg(long = "address", value_name = "IP|NAME", required = true)]
        addresses: Vec<String>,
        /// Where to write; nothing there is overwritten.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// How many days it is good for.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// What `lichen audit` does.
#[derive(Subcommand)]
enum AuditAction {
    /// Walk the chain of hashes of DATA_DIR/audit.log (and its rotated
    /// files): a line changed, removed or inserted is named, with a
    /// non-zero exit.
    Verify {
        /// The host's data directory.
        #[arg(long, default_value = "./lichen-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Make token NAME with the given scopes (functions:read,
    /// functions:deploy:PATTERN, functions:delete:PATTERN, status:read,
    /// tokens:admin, secrets:PATTERN; `*` in a pattern is any run of
    /// characters) and print it: it is shown this once.
    Create {
        name: String,
        #[arg(long = "scope", value_name = "SCOPE", required = true)]
        scopes: Vec<String>,
        /// How long it is good for: 90d, 12h, 30m, 45s; forever without.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// List the tokens: name, scopes, created, expires, last used here.
    Ls {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Revoke token NAME, on every host of the cluster.
    Revoke {
        name: String,
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// A secret's value from `file` ([`secret_from`]) or standard input, where
/// the trailing newline `echo` adds is dropped the same way.
fn secret_value(file: Option<&std::path::Path>) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    if let Some(file) = file {
        return secret_from(file).map(String::into_bytes);
    }
    let mut value = String::new();
    std::io::stdin()
        .read_to_string(&mut value)
        .map_err(|e| anyhow::anyhow!("reading the secret from standard input: {e}"))?;
    Ok(value.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
}

/// A `--peer`, with the gossip port when it has none.
fn peer_address(text: &str) -> Result<String, String> {
    lichen_core::gossip::seed_address(text)
}

/// `250ms`, `5s`, `1m`, as policies write durations.
fn byte_size(text: &str) -> Result<u64, String> {
    let value: lichen::policy::ByteSize = toml::Value::String(text.to_string())
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    Ok(value.0)
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    lichen::policy::parse_duration(text)
}

async fn print(run: impl Future<Output = anyhow::Result<String>>) -> anyhow::Result<()> {
    println!("{}", run.await?);
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let mut config = ServeConfig::new(args.listen, args.data_dir);
    config.policies_dir = args.policies;
    config.admin_token = match (args.admin_token, &args.admin_token_file) {
        (Some(token), _) => Some(token),
        (None, Some(file)) => Some(secret_from(file)?),
        (None, None) => None,
    };
    config.secrets_key_file = args.secrets_key_file;
    config.protected.extend(args.admin_token_file.clone());
    config.protected.extend(lichen::config::config_path(
        &std::env::args_os().collect::<Vec<_>>(),
    ));
    config.max_upload = args.max_upload_bytes;
    config.metrics_require_token = args.metrics_require_token;
    config.ui = args.ui;
    config.drain = args.drain;
    config.scoped = lichen_core::grants::Ceilings {
        memory: args.scoped_max_memory,
        timeout: args.scoped_max_timeout,
        concurrency: args.scoped_max_concurrency,
        queue: args.scoped_max_queue,
        instances: args.scoped_max_instances,
        body: args.scoped_max_body,
    };
    config.max_connections = args.max_connections;
    config.max_in_flight = args.max_in_flight;
    config.max_loaded_functions = args.max_loaded_functions;
    config.kv_nats_auth = lichen::kv::nats::NatsAuth {
        creds: args.kv.kv_nats_creds.clone(),
        nkey: args.kv.kv_nats_nkey.clone(),
        ca: args.kv.kv_nats_ca.clone(),
        cert: args.kv.kv_nats_cert.clone(),
        key: args.kv.kv_nats_key.clone(),
    };
    config.protected.extend(
        [
            args.kv.kv_nats_creds.clone(),
            args.kv.kv_nats_nkey.clone(),
            args.kv.kv_nats_key.clone(),
        ]
        .into_iter()
        .flatten(),
    );
    config.kv = args.kv.config()?;
    config.protected.extend(
        [
            args.cluster.cluster_secret_file.clone(),
            args.cluster.cluster_secret_previous_file.clone(),
        ]
        .into_iter()
        .flatten(),
    );
    // Checked here too: a config file's values reach clap as defaults,
    // which its `requires` does not check.
    let peers_tls = if args.cluster.peer_mtls {
        if args.tls_cert.is_none() || args.tls_key.is_none() {
            anyhow::bail!(
                "--peer-mtls needs --tls-cert and --tls-key: the certificate this host presents to its peers"
            );
        }
        let Some(ca) = args.cluster.peer_ca.clone() else {
            anyhow::bail!(
                "--peer-mtls needs --peer-ca: the CA of this cluster's certificates (lichen cluster ca), which signs for nothing else"
            );
        };
        Some(ca)
    } else {
        None
    };
    config.cluster = args.cluster.config(args.listen, &config.kv)?;
    for pin in &args.resolve {
        let (name, ip) = pin
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--resolve {pin}: use NAME=IP"))?;
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| anyhow::anyhow!("--resolve {pin}: {ip:?} is not an IP address"))?;
        config
            .outbound
            .pinned
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(ip);
    }
    config.outbound.ca_cert = args.outbound_ca;
    config.trace.endpoint = args.otlp_endpoint;
    config.trace.sampling = args.trace_sampling;
    config.trace.trust_client = args.trace_trust_client;
    for header in &args.otlp_header {
        let (name, value) = header
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--otlp-header {header:?}: use NAME=VALUE"))?;
        config
            .trace
            .headers
            .push((name.trim().to_string(), value.to_string()));
    }
    config.outbound.keep_alive = !args.outbound_no_keep_alive;
    config.registry = lichen::oci::RegistryConfig {
        allowed: args.registry.allow_registries,
        insecure: args.registry.insecure_registries,
        require_digest: args.registry.require_digest,
        auth_file: args.registry.registry_auth,
        ca_cert: args.registry.registry_ca,
    };
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(lichen::tls::TlsFiles {
            cert,
            key,
            dir: args.tls_dir,
            strict_sni: args.tls_strict_sni,
            peers: peers_tls,
        });
    }
    let server = Server::bind(config).await?;
    server.run(server::shutdown_signal()).await
}
