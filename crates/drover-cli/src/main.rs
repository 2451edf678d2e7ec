//! `drover`: the controller, the agent and the command-line client in one binary.

/// The data plane and the controller allocate and free many small buffers per message
/// (frames, envelopes, NATS headers); glibc's allocator was a quarter of the agent's
/// CPU time under a full pipeline, which mimalloc cuts. Built without transparent huge
/// pages, which took an idle agent from 9.5 MiB to 24.5 MiB resident; without them it
/// is 16 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod client;
mod cluster;
mod config;
mod globals;
mod input;
mod output;
mod pack;
mod pipeline;
mod vertex;
mod wait;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use client::Client;
use drover_core::api::StreamEvent;
use drover_core::artifact::{Artifact, ArtifactRef, Digest, NewArtifact, Variant};
use drover_core::platform::BinaryPlatform;
use drover_core::protocol::LogStream;
use drover_core::quantity::ByteSize;
use drover_core::spec::{JobKind, JobSpec, Resources, RuntimeKind};
use drover_core::state::{Exit, JobStatus};
use output::Output;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Exit codes that mean something to scripts.
mod code {
    /// The command failed: bad input, an error from the server, an unreachable server.
    pub const ERROR: i32 = 1;
    /// The command was called wrongly (clap's own usage errors exit with this too).
    pub const USAGE: i32 = 2;
    /// The named object does not exist.
    pub const NOT_FOUND: i32 = 4;
    /// The token was refused.
    pub const UNAUTHORIZED: i32 = 5;
    /// `drover job plan` (and `job apply --dry-run`): applying would change something.
    /// Every error of a plan exits with `ERROR`, so that 2 means only this, as with
    /// `terraform plan -detailed-exitcode`.
    pub const CHANGES: i32 = 2;
}

/// A mistake in how a command was called that only shows once its flags are read (a
/// flag's file that is missing, a value none of its sources gave); like clap's own usage
/// errors, it exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// The commit this binary was built from (12 hex digits), or "unknown" outside a git
/// checkout; set by `build.rs`.
pub(crate) const COMMIT: &str = env!("DROVER_COMMIT");

/// Where an agent may also find its join token, besides its flags.
const JOIN_TOKEN_ENV: &str = drover_agent::JOIN_TOKEN_ENV_NAME;

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Run batch jobs and services on a fleet of machines.",
    long_about = "Drover runs batch jobs and services on a fleet of machines.\n\n\
        One binary is the controller, the agent and this client. To try it, run a command\n\
        with no setup at all:\n\n    drover run -- sh -c 'echo hello'\n\n\
        For a cluster that stays up, run `drover up` in one shell and use `drover job`,\n\
        `drover task`, `drover logs` and `drover node` from another.\n\n\
        Logs go to stderr; DROVER_LOG sets the level (e.g. debug, or drover_agent=debug) and\n\
        DROVER_LOG_FORMAT=json makes them one JSON object per line.",
    after_help = "Server and token come from --server/--token, then DROVER_SERVER and\n\
        DROVER_TOKEN, then a context of the config file\n\
        ($XDG_CONFIG_HOME/drover/config.yaml): the one --context or DROVER_CONTEXT\n\
        names, else the current one (`drover context ls`). Each `drover up` adds a\n\
        context for its cluster. The project comes from --project, then\n\
        DROVER_PROJECT, then the context's `project:`."
)]
struct Cli {
    /// The controller's URL, e.g. https://controller:7700 (`drover up` serves
    /// http://127.0.0.1:7700).
    #[arg(long, global = true, env = "DROVER_SERVER")]
    server: Option<String>,
    /// For an https:// server: a PEM file of the CA that signed its certificate, or of
    /// the certificate itself (a copy of a server's generated DATA_DIR/tls/cert.pem),
    /// trusted instead of the system's roots.
    #[arg(long, global = true, env = "DROVER_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// For an https:// server: trust its certificate only if its SHA-256 fingerprint is
    /// this, as `drover server` prints it (sha256:HEX). With no --ca, the pin alone
    /// decides, which suits a server's generated certificate.
    #[arg(
        long,
        global = true,
        env = "DROVER_SERVER_FINGERPRINT",
        value_name = "sha256:HEX"
    )]
    server_fingerprint: Option<String>,
    /// The API token.
    #[arg(long, global = true, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The project to act in. A project token acts only in its own project; a cluster
    /// admin token acts in every project unless this names one.
    #[arg(long, global = true, env = "DROVER_PROJECT")]
    project: Option<String>,
    /// The context of the CLI config to use instead of its current one (see `drover
    /// context ls`); --server, --token and the others override its settings.
    #[arg(long, global = true, env = "DROVER_CONTEXT", value_name = "NAME")]
    context: Option<String>,
    /// Output format of listings.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command as a job and stream its output; exits with the task's exit code.
    ///
    /// Without a configured server this starts a throwaway cluster in this process.
    #[command(
        after_help = "Examples:\n  drover run -- sh -c 'echo hello'\n  drover run --count 3 -e WORD=hi -- sh -c 'echo $WORD $DROVER_TASK_INDEX'\n  drover run --service -- python3 -m http.server 8000"
    )]
    Run(RunArgs),
    /// Run a persistent controller and a local agent (SQLite in the data dir).
    ///
    /// Writes the server address and an admin token to the CLI config so that other
    /// drover commands in other shells just work.
    Up(UpArgs),
    /// Run only the controller; agents join with the join token it keeps in its data dir.
    #[command(
        after_help = "The server serves HTTPS: with --tls-cert and --tls-key, or else with a\n\
            certificate it generates once and keeps in DATA_DIR/tls/. It prints the\n\
            certificate's fingerprint, which agents and clients pin to trust it\n\
            (--insecure-http serves plain HTTP instead).\n\n\
            Agents join with the token in DATA_DIR/join-token. Give it to them in a file\n\
            or in the environment, not on the command line, where `ps` shows it to every\n\
            user:\n  \
            drover agent --server https://CONTROLLER:7700 \\\n      \
            --server-fingerprint sha256:HEX --join-token-file /etc/drover/join-token\n  \
            DROVER_JOIN_TOKEN=\"$(cat /etc/drover/join-token)\" \\\n      \
            drover agent --server https://CONTROLLER:7700 --ca cert.pem\n\n\
            The cluster admin token is in DATA_DIR/admin-token. If every cluster admin\n\
            token was revoked or lost, make a new one on this host (it needs the data\n\
            dir, not a token):\n  \
            drover server --reset-admin-token --data-dir DATA_DIR"
    )]
    Server(ServerArgs),
    /// Run only an agent that dials out to a controller.
    #[command(
        after_help = "The join token comes from --join-token-file or, without it, from\n\
            DROVER_JOIN_TOKEN. --join-token still works (a flag wins over the variable),\n\
            but `ps` shows it to every user of the machine:\n  \
            drover agent --server https://CONTROLLER:7700 \\\n      \
            --server-fingerprint sha256:HEX --join-token-file /etc/drover/join-token\n  \
            DROVER_JOIN_TOKEN=\"$(cat /etc/drover/join-token)\" \\\n      \
            drover agent --server https://CONTROLLER:7700 --ca cert.pem\n\n\
            An https:// server's certificate is trusted by --server-fingerprint (as\n\
            `drover server` prints it), by --ca FILE, or else by the system's roots;\n\
            nothing is sent to a server that is not trusted."
    )]
    Agent(AgentArgs),
    /// Submit, list, inspect and stop jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// List tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// List nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Print the output of a job's tasks or of one task.
    Logs(LogsArgs),
    /// List and prune the environments nodes keep for jobs' runtime_env (cluster admin).
    #[command(subcommand)]
    Env(EnvCmd),
    /// Push, list, inspect and remove artifacts: builds for every platform under one name.
    #[command(
        subcommand,
        long_about = "Push, list, inspect and remove artifacts.\n\n\
            An artifact is a named, immutable version (NAME:VERSION) holding one file per\n\
            platform: the same program built for linux/amd64, linux/arm64, darwin/arm64...,\n\
            or a script that runs anywhere. A job names it with `artifact: NAME:VERSION`;\n\
            each node then gets the variant that runs there, and a node for which there is\n\
            none is not given the task.\n\n\
            Files are stored by their SHA-256, so bytes shared by several artifacts are\n\
            stored, and uploaded, once. Removing an artifact deletes the files no other\n\
            artifact uses.",
        after_help = "Examples:\n  \
            drover artifact push app:1.0 target/x86_64-unknown-linux-gnu/release/app \\\n      \
            target/aarch64-unknown-linux-gnu/release/app\n  \
            drover artifact push tool:2 tool.sh\n  \
            drover artifact ls\n  \
            drover artifact inspect app:1.0 -o json\n  \
            drover artifact rm app:1.0"
    )]
    Artifact(ArtifactCmd),
    /// Create and list projects: tenants whose jobs, tasks, artifacts and tokens no other
    /// project can see or change (cluster admin).
    #[command(
        subcommand,
        after_help = "Examples:\n  \
            drover project create team-a\n  \
            drover token create --project team-a --role write > team-a.token\n  \
            DROVER_TOKEN=$(cat team-a.token) drover job ls"
    )]
    Project(ProjectCmd),
    /// Create, list and revoke API tokens.
    #[command(
        subcommand,
        long_about = "Create, list and revoke API tokens.\n\n\
            A token belongs to one project and has a role there: read (see the project's\n\
            jobs, tasks, logs and artifacts), write (also submit, stop and push) or admin\n\
            (also manage the project's tokens). The cluster admin token `drover up` makes\n\
            acts in every project. Cluster admin and join (agent) tokens are the cluster\n\
            admin's alone: only it lists, creates and revokes them, and the last cluster\n\
            admin token cannot be revoked. Only a hash of each token is stored; a token is\n\
            shown once, when it is created.",
        after_help = "Examples:\n  \
            drover token create --project team-a --role read --name dashboard\n  \
            drover token create --role cluster --name second-admin\n  \
            drover token ls\n  \
            drover token revoke 3f9c2a7b1d04"
    )]
    Token(TokenCmd),
    /// Switch between clusters (and projects, and tokens) kept in the CLI config.
    #[command(
        subcommand,
        after_help = "Each `drover up` adds a context for its cluster and makes it current;\n`drover token create --save NAME` adds one for the new token.\n\nExamples:\n  drover context ls\n  drover context use local-7701\n  drover --context local job ls\n  DROVER_CONTEXT=team-a drover run -- echo hi"
    )]
    Context(ContextCmd),
    /// Apply, list, inspect, pause, resume and delete pipelines: sources, maps and
    /// sinks joined by durable buffers, each vertex a service whose tasks are its
    /// replicas.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
            drover pipeline apply -f etl.yaml\n  \
            drover pipeline ls\n  \
            drover pipeline status etl -o json\n  \
            drover pipeline pause etl\n  \
            drover pipeline resume etl --slow\n  \
            drover pipeline send web in 'hello'\n  \
            drover pipeline delete etl"
    )]
    Pipeline(pipeline::PipelineCmd),
    /// Print this client's version and commit, and the server's when one is configured.
    Version,
    /// Print shell completions, e.g. `drover completions bash > /etc/bash_completion.d/drover`.
    Completions {
        /// The shell to print them for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct RunArgs {
    /// How many tasks to run.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// An environment variable for the tasks, KEY=VALUE; repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_kv)]
    env: Vec<(String, String)>,
    /// Keep the tasks running (restart them when they exit) until interrupted.
    #[arg(long)]
    service: bool,
    /// The job's name (default: run-<random>). A job of that name of the same kind and
    /// runtime gets a new version; one of another kind or runtime is only replaced with
    /// --replace.
    #[arg(long)]
    name: Option<String>,
    /// Let --name replace a job of another kind (service or batch) or runtime.
    #[arg(long, requires = "name")]
    replace: bool,
    /// Remove the job (with its tasks and logs) once it has ended, like `docker run
    /// --rm`. Without --name a run's job is kept for an hour; a named one as long as
    /// the server keeps finished jobs (24h unless configured).
    #[arg(long)]
    rm: bool,
    /// The runtime: process, mock, docker or plugin:NAME (docker when --image is given).
    #[arg(long)]
    runtime: Option<String>,
    /// Run the command in a container of this image (implies --runtime docker); the
    /// command replaces the image's entrypoint.
    #[arg(long)]
    image: Option<String>,
    /// How many times a failed task is retried (like `docker run`, none by default).
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// CPU cores each task reserves.
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory each task reserves, e.g. 256Mi.
    #[arg(long)]
    memory: Option<String>,
    /// Send stdin to the tasks even when it is a terminal (read until Ctrl-D). Without
    /// it, stdin is sent when it is a pipe or a file (`echo x | drover run -- cat`), up
    /// to 64Mi, and every task of the job reads the same input.
    #[arg(long = "stdin", short = 'i')]
    stdin: bool,
    /// Never send stdin; the tasks read /dev/null.
    #[arg(long, conflicts_with = "stdin")]
    no_stdin: bool,
    /// A local executable to run: it is uploaded as an artifact (its platform read from
    /// its header) and each node gets it in the task's directory. Arguments for it go
    /// after `--`.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// The program and its arguments (or, with FILE, the arguments for it).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Args)]
struct UpArgs {
    /// A NATS server (with JetStream) for pipelines whose spec says `buffer.backend:
    /// nats`, e.g. nats://127.0.0.1:4222; without it such pipelines are refused. The
    /// server must be reachable at start-up.
    #[arg(long, value_name = "URL", env = "DROVER_NATS")]
    nats: Option<String>,
    /// Where the database, logs and the agent's tasks live.
    #[arg(long, env = "DROVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The address the API listens on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Make a new cluster admin token, store it, write it to DATA_DIR/admin-token and
    /// exit without starting anything; the next `drover up` puts it in the CLI config.
    /// The way back in when every cluster admin token was revoked or lost.
    #[arg(long)]
    reset_admin_token: bool,
    #[command(flatten)]
    timing: TimingArgs,
    #[command(flatten)]
    runtimes: RuntimeArgs,
}

#[derive(Args)]
struct ServerArgs {
    /// A NATS server (with JetStream) for pipelines whose spec says `buffer.backend:
    /// nats`, e.g. nats://127.0.0.1:4222; without it such pipelines are refused. The
    /// server must be reachable at start-up.
    #[arg(long, value_name = "URL", env = "DROVER_NATS")]
    nats: Option<String>,
    /// Where the database, logs, blobs and the admin and join tokens live.
    #[arg(long, env = "DROVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The address the API listens on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Make a new cluster admin token, store it, write it to DATA_DIR/admin-token and
    /// exit without serving. The way back in when every cluster admin token was revoked
    /// or lost; it needs the data dir, not a token. A running server accepts the new
    /// token from its next start.
    #[arg(long)]
    reset_admin_token: bool,
    #[command(flatten)]
    timing: TimingArgs,
    #[command(flatten)]
    connections: ConnectionArgs,
    /// The certificate chain (PEM) to serve HTTPS with, its own certificate first;
    /// without it (and --tls-key) the server generates one in DATA_DIR/tls/.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "insecure_http"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        conflicts_with = "insecure_http"
    )]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP rather than HTTPS. Tokens then cross the network readable by
    /// anyone on it: only for a network nobody else can reach.
    #[arg(long)]
    insecure_http: bool,
    /// The token agents must present (default: generated once and kept in the data dir).
    #[arg(long, env = "DROVER_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
}

/// The runtimes an agent offers besides `process` and `mock`; shared by `drover up` and
/// `drover agent`.
#[derive(Args)]
struct RuntimeArgs {
    /// An external runtime plugin, NAME=PATH; repeatable. Jobs use it with
    /// `runtime: plugin:NAME`. The protocol is in docs/plugin-protocol.md.
    #[arg(long = "plugin", value_parser = parse_plugin, value_name = "NAME=PATH")]
    plugins: Vec<(String, PathBuf)>,
    /// The Docker engine to run `runtime: docker` tasks on (default: the local socket).
    #[arg(long, env = "DOCKER_HOST", value_name = "URL")]
    docker_host: Option<String>,
    /// Do not offer the docker runtime even when an engine answers.
    #[arg(long)]
    no_docker: bool,
    /// Run another platform's binaries through an emulator, PLATFORM=INTERPRETER (e.g.
    /// linux/arm64=qemu-aarch64-static); repeatable. Such builds are placed here only
    /// when no node runs one of the artifact's builds natively.
    #[arg(long = "emulate", value_parser = parse_emulate, value_name = "PLATFORM=INTERPRETER")]
    emulate: Vec<(drover_core::platform::Platform, PathBuf)>,
    /// How much disk the node's artifact cache may use, e.g. 2Gi; blobs no running task
    /// uses are evicted, least recently used first, past it.
    #[arg(long, default_value = "10Gi", value_parser = parse_byte_size, value_name = "SIZE")]
    artifact_cache_size: ByteSize,
    /// How much disk the node's cached runtime environments (runtime_env.python) may
    /// use; unused ones are evicted, least recently used first, past it.
    #[arg(long, default_value = "5Gi", value_parser = parse_byte_size, value_name = "SIZE")]
    env_cache_size: ByteSize,
    /// The Python interpreter runtime_env.python environments are built with.
    #[arg(long, default_value = "python3", value_name = "PATH")]
    python: PathBuf,
    /// The uids process tasks run as when the agent runs as root, FIRST-LAST: each task
    /// gets one of its own (and a private group of the same number), so tenants on one
    /// node cannot read each other's processes or files. `none` runs tasks as the agent's
    /// own user.
    #[arg(long, default_value = "200000-265535", value_parser = parse_uid_range, value_name = "FIRST-LAST|none")]
    task_uid_range: UidRange,
}

/// The value of --task-uid-range: a range, or none.
#[derive(Clone, Debug)]
struct UidRange(Option<std::ops::RangeInclusive<u32>>);

fn parse_uid_range(s: &str) -> Result<UidRange, String> {
    if s == "none" {
        return Ok(UidRange(None));
    }
    drover_agent::users::parse_range(s).map(|r| UidRange(Some(r)))
}

fn parse_byte_size(s: &str) -> Result<ByteSize, String> {
    ByteSize::parse(s)
}

impl RuntimeArgs {
    fn options(&self) -> cluster::RuntimeOptions {
        cluster::RuntimeOptions {
            docker: !self.no_docker,
            docker_host: self.docker_host.clone(),
            plugins: self.plugins.clone(),
            emulate: self.emulate.clone(),
            artifact_cache_bytes: Some(self.artifact_cache_size.0),
            env_cache_bytes: Some(self.env_cache_size.0),
            python: Some(self.python.clone()),
            no_task_users: self.task_uid_range.0.is_none(),
            task_uid_range: self.task_uid_range.0.clone(),
        }
    }
}

fn parse_emulate(s: &str) -> Result<(drover_core::platform::Platform, PathBuf), String> {
    let (platform, interpreter) = s
        .split_once('=')
        .ok_or_else(|| format!("--emulate {s:?}: expected PLATFORM=INTERPRETER"))?;
    let platform = platform
        .trim()
        .parse()
        .map_err(|e| format!("--emulate {s:?}: platform {platform:?}: {e}"))?;
    if interpreter.trim().is_empty() {
        return Err(format!(
            "--emulate {s:?}: expected an interpreter (a path or a name in PATH) after '='"
        ));
    }
    Ok((platform, PathBuf::from(interpreter.trim())))
}

fn parse_plugin(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = parse_kv(s)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "plugin name {name:?}: expected letters, digits, '-' or '_'"
        ));
    }
    if path.is_empty() {
        return Err(format!("plugin {name}: expected a path after '='"));
    }
    Ok((name, PathBuf::from(path)))
}

/// Liveness settings shared by `drover up` and `drover server`.
#[derive(Args)]
struct TimingArgs {
    /// How often agents must send a heartbeat.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    heartbeat_interval: std::time::Duration,
    /// How long a node may be silent before it is unreachable and its tasks unknown
    /// (each job's `disconnect.lost_after` then decides when they are replaced).
    #[arg(long, alias = "node-lost-after", default_value = "15s", value_parser = parse_duration)]
    node_timeout: std::time::Duration,
    /// How long an unreachable node is kept before it is lost, with every task on it
    /// that was still unknown.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    node_gone_after: std::time::Duration,
    /// How long a finished job is kept, with its tasks and their logs, after it ended.
    /// Ended attempts that a retry replaced go after this long too.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    job_retention: std::time::Duration,
    /// The most finished job versions kept; past it the oldest are removed before
    /// their retention runs out.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    max_finished_jobs: u32,
    /// How long a lost node with no tasks left stays listed after it was last seen;
    /// `drover node rm` removes one at once.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    lost_node_retention: std::time::Duration,
}

impl TimingArgs {
    fn retention(&self) -> drover_controller::Retention {
        drover_controller::Retention {
            finished_jobs: self.job_retention,
            max_finished_jobs: self.max_finished_jobs as usize,
            lost_nodes: self.lost_node_retention,
            ..Default::default()
        }
    }
}

/// Limits on the connections `drover server` holds, so that clients that open many or
/// send slowly cannot use up its file descriptors.
#[derive(Args)]
struct ConnectionArgs {
    /// The most connections one client address may hold open; more are closed at once.
    /// Agents behind one NAT address share it: raise it for a fleet larger than this
    /// behind one address.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    max_connections_per_ip: u32,
    /// The most connections held open at once from everyone (default: the open-file
    /// limit, `ulimit -n`, less a reserve for the store, logs and blobs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    max_connections: Option<u32>,
    /// How long a client may take to send a request's headers; an idle keep-alive
    /// connection is closed after this long too. Streaming answers (`logs -f`) and
    /// agents' connections are not affected.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration, value_name = "DURATION")]
    header_read_timeout: std::time::Duration,
}

impl ConnectionArgs {
    fn limits(&self) -> cluster::ConnectionLimits {
        cluster::ConnectionLimits {
            max_per_ip: self.max_connections_per_ip as usize,
            max_total: self.max_connections.map(|n| n as usize),
            header_read_timeout: self.header_read_timeout,
        }
    }
}

fn parse_positive_duration(s: &str) -> Result<std::time::Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("expected a duration above zero, like 10s".into()),
        d => Ok(d),
    }
}

#[derive(Args)]
struct AgentArgs {
    /// The join token itself. Every user of the machine can read it here (in `ps`), so
    /// prefer --join-token-file or DROVER_JOIN_TOKEN; kept for compatibility.
    #[arg(long, value_name = "TOKEN", conflicts_with = "join_token_file")]
    join_token: Option<String>,
    /// A file holding the join token, e.g. a copy of the server's DATA_DIR/join-token;
    /// surrounding whitespace is ignored. Without this flag or --join-token, the token
    /// comes from DROVER_JOIN_TOKEN.
    #[arg(long, value_name = "PATH")]
    join_token_file: Option<PathBuf>,
    /// Where the agent keeps its identity, outbox and task directories.
    #[arg(long, env = "DROVER_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The node's name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// A node label, KEY=VALUE; repeatable. Jobs select nodes with constraints on them.
    #[arg(long = "label", value_parser = parse_kv)]
    labels: Vec<(String, String)>,
    /// CPU cores offered to tasks (default: all).
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory offered to tasks, e.g. 8Gi (default: all).
    #[arg(long)]
    memory: Option<String>,
    #[command(flatten)]
    runtimes: RuntimeArgs,
}

impl AgentArgs {
    /// The join token, from the first of its sources that is given: a flag
    /// (--join-token-file or --join-token; clap refuses both at once), then
    /// DROVER_JOIN_TOKEN. A source that is given but holds nothing is a usage error
    /// naming it, rather than falling through to the next.
    fn join_token(&self) -> Result<String> {
        if let Some(path) = &self.join_token_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                UsageError(format!(
                    "--join-token-file {}: cannot read the join token: {e}",
                    path.display()
                ))
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(UsageError(format!(
                    "--join-token-file {}: the file is empty; expected the join token (the server keeps it in DATA_DIR/join-token)",
                    path.display()
                ))
                .into());
            }
            return Ok(token.to_string());
        }
        if let Some(token) = &self.join_token {
            let token = token.trim();
            if token.is_empty() {
                return Err(UsageError(
                    "--join-token: expected a token, got an empty value".into(),
                )
                .into());
            }
            return Ok(token.to_string());
        }
        match std::env::var(JOIN_TOKEN_ENV) {
            Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_string()),
            Ok(_) => Err(UsageError(format!(
                "{JOIN_TOKEN_ENV} is set but empty; expected the join token (the server keeps it in DATA_DIR/join-token)"
            ))
            .into()),
            Err(std::env::VarError::NotUnicode(_)) => Err(UsageError(format!(
                "{JOIN_TOKEN_ENV}: expected the join token as UTF-8 text"
            ))
            .into()),
            Err(std::env::VarError::NotPresent) => Err(UsageError(format!(
                "drover agent needs the join token the server keeps in DATA_DIR/join-token: pass --join-token-file PATH or set {JOIN_TOKEN_ENV}"
            ))
            .into()),
        }
    }
}

#[derive(Subcommand)]
enum JobCmd {
    /// Submit a job from a YAML file (a new version if the name exists and the spec changed).
    Apply {
        /// The job's YAML spec; `-` reads it from standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Makes the submission safe to repeat: within 24 hours, another apply with the
        /// same key gets the first answer and changes nothing (a retry after a lost
        /// answer runs nothing twice). The CLI uses a fresh key for its own retries
        /// when none is given.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Change nothing: only show what applying would do, as `drover job plan`
        /// does, with its exit codes (0 no changes, 2 changes, 1 error).
        #[arg(long, conflicts_with_all = ["idempotency_key", "detach"])]
        dry_run: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show what applying a spec would do, changing nothing: create the job, update it
    /// to a new version (all its tasks replaced), scale it, or nothing; each changed
    /// field with its old and new value; and whether the cluster can place the tasks
    /// that would start, or why not.
    ///
    /// Exits 0 when applying would change nothing, 2 when it would change something
    /// and 1 on any error, so a script can tell the three apart.
    #[command(
        after_help = "Examples:\n  drover job plan -f web.yaml\n  drover job plan -f - < web.yaml\n  drover job plan -f web.yaml -o json\n  drover job apply --dry-run -f web.yaml    (the same)\n\nExit codes: 0 no changes, 2 changes, 1 error."
    )]
    Plan {
        /// The job's YAML spec; `-` reads it from standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Run a finished job again, unchanged, as a new version.
    Rerun {
        /// The job's name.
        name: String,
    },
    /// List a job's versions the server still keeps, newest first: when each was made,
    /// how it ended and what changed (`-o json` gives each version's whole spec).
    History {
        /// The job's name.
        name: String,
    },
    /// Apply an earlier version's spec again, as a new version.
    Revert {
        /// The job's name.
        name: String,
        /// The version whose spec to apply, as `drover job history` lists it.
        version: u32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a finished job: every version of it, with its tasks and their logs. A
    /// running job is refused; `drover job stop` it first.
    #[command(alias = "remove")]
    Rm {
        /// The job's name.
        name: String,
    },
    /// List jobs.
    Ls,
    /// Show a job, its tasks, and a timeline of what happened to them (placed,
    /// started, exited, restarted, and why), newest last.
    Status {
        /// The job's name.
        name: String,
        /// Show it again every second until the job has ended (or Ctrl-C).
        #[arg(long, short = 'w')]
        watch: bool,
        #[command(flatten)]
        events: EventsArg,
    },
    /// Stop a job's tasks: SIGTERM, then SIGKILL after its stop_grace. Waits until every
    /// task has ended, unless --detach.
    Stop {
        /// The job's name.
        name: String,
        /// Kill the tasks at once (SIGKILL), without waiting out stop_grace; this also
        /// ends tasks already stopping under a longer grace.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// How a command that changes a job waits for the change to take effect.
#[derive(Args)]
struct WaitArgs {
    /// Return as soon as the controller has accepted the change, without waiting.
    #[arg(long, short = 'd')]
    detach: bool,
    /// How long to wait before giving up (the change goes on): e.g. 30s, 10m.
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    timeout: std::time::Duration,
}

impl WaitArgs {
    /// Waits for `goal` unless detached; Ctrl-C ends the wait, not the change.
    async fn wait(
        &self,
        c: &Client,
        name: &str,
        goal: wait::Goal,
    ) -> Result<Option<wait::Reached>> {
        if self.detach {
            return Ok(None);
        }
        tokio::select! {
            r = wait::wait(c, name, goal, self.timeout) => r.map(Some),
            _ = tokio::signal::ctrl_c() => {
                bail!("stopped waiting; job {name} goes on (`drover job status {name}`)")
            }
        }
    }
}

/// How much of a timeline a status shows.
#[derive(Args)]
struct EventsArg {
    /// How many of the latest events to show: a number, or `all` (`-o json` always has
    /// every event the server keeps).
    #[arg(long, default_value = "20", value_parser = parse_event_limit, value_name = "N|all")]
    events: output::EventLimit,
}

fn parse_event_limit(s: &str) -> Result<output::EventLimit, String> {
    if s == "all" {
        return Ok(output::EventLimit::All);
    }
    s.parse::<usize>()
        .map(output::EventLimit::Latest)
        .map_err(|_| format!("expected a number of events or all, got {s:?}"))
}

#[derive(Subcommand)]
enum TaskCmd {
    /// List tasks, of all jobs or of one: the latest attempt of each task index, with
    /// how often it was restarted (-o json lists every attempt).
    Ls {
        /// Only this job's tasks.
        #[arg(long)]
        job: Option<String>,
        /// Every attempt of each index, and the tasks of the job's earlier versions
        /// the server still keeps, not only the current version's latest attempts.
        #[arg(long)]
        all: bool,
        /// Show the list again every second until Ctrl-C.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Show one task (any attempt, of any version the server keeps) and the timeline of
    /// what happened to it.
    Status {
        /// The task's id, or a prefix of it that names one task.
        id: String,
        #[command(flatten)]
        events: EventsArg,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes.
    Ls,
    /// Remove a node that is no longer connected (cluster admins only). Tasks still
    /// recorded on it are marked lost, and replaced where their job allows. A connected
    /// node is refused: stop its agent first, or it registers again at once. Lost nodes
    /// are removed on their own after `--lost-node-retention` (24h by default).
    #[command(alias = "remove")]
    Rm {
        /// The node's name, or its id where several nodes share a name.
        node: String,
    },
}

#[derive(Subcommand)]
enum ProjectCmd {
    /// Create a project (1 to 63 lowercase letters, digits and '-').
    Create {
        /// The new project's name.
        name: String,
    },
    /// List projects: every one for the cluster admin, a token's own for anyone else.
    Ls,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token for the project named by --project (else the caller's own) and
    /// print only its secret on stdout, for scripts.
    Create {
        /// What the token may do: in its project (admin, write, read), or cluster-wide
        /// (cluster: another cluster admin; agent: another join token; cluster admin only).
        #[arg(long, value_enum)]
        role: TokenRole,
        /// A label to recognise it by in `drover token ls`.
        #[arg(long)]
        name: Option<String>,
        /// Also keep the token in the CLI config as a context of this name (with the
        /// server in use and the token's project), and make it the current one.
        #[arg(long, value_name = "CONTEXT")]
        save: Option<String>,
    },
    /// List tokens (never their secrets): a project admin sees its project's.
    Ls,
    /// Revoke a token by the ID `drover token ls` shows; requests with it fail from now on.
    Revoke {
        /// The token's ID, as `drover token ls` shows it.
        id: String,
    },
}

#[derive(Subcommand)]
enum ContextCmd {
    /// List the contexts (never their tokens); `*` marks the current one.
    Ls,
    /// Make a context the current one.
    Use {
        /// The context's name, as `drover context ls` shows it.
        name: String,
    },
    /// Remove a context (its cluster is untouched).
    Rm {
        /// The context's name.
        name: String,
    },
    /// Give a context another name.
    Rename {
        /// The context's current name.
        old: String,
        /// Its new name.
        new: String,
    },
}

/// The roles `drover token create` offers. The server decides who may create which: the
/// cluster-level ones (cluster, agent) only a cluster admin.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum TokenRole {
    Admin,
    Write,
    Read,
    Cluster,
    Agent,
}

impl TokenRole {
    fn role(self) -> drover_core::auth::Role {
        match self {
            TokenRole::Admin => drover_core::auth::Role::Admin,
            TokenRole::Write => drover_core::auth::Role::Write,
            TokenRole::Read => drover_core::auth::Role::Read,
            TokenRole::Cluster => drover_core::auth::Role::Cluster,
            TokenRole::Agent => drover_core::auth::Role::Agent,
        }
    }
}

#[derive(Subcommand)]
enum EnvCmd {
    /// List the environments cached on nodes (runtime_env.python virtual environments):
    /// their requirements, size, last use and how many running tasks use them.
    Ls {
        /// Only this node (a name or an id).
        #[arg(long)]
        node: Option<String>,
    },
    /// Remove cached environments no running task uses, on every node or one. The next
    /// task that needs one builds it again.
    Prune {
        /// Only this node (a name or an id).
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Subcommand)]
enum ArtifactCmd {
    /// Upload files as a new artifact version, one variant per platform.
    #[command(
        long_about = "Upload files as a new artifact version, one variant per platform.\n\n\
            Each file's platform is read from its header: an ELF, Mach-O or PE executable\n\
            names its OS, architecture and (for Linux) C library; a universal Mach-O gives\n\
            one variant per architecture inside it; a `#!` script is `any`. When a file\n\
            says nothing (data, an archive) or says it wrongly, name the platform after\n\
            '@': FILE@linux/arm64, FILE@linux/amd64/v2+gnu, FILE@darwin/arm64, FILE@any.\n\n\
            Platforms are OS/ARCH[/VARIANT][+LIBC]: +gnu or +musl for a dynamically\n\
            linked Linux binary, nothing for a static one; VARIANT is an amd64 level\n\
            (v1-v4) or an arm version (v7, v8...).\n\n\
            Files the controller already has (same SHA-256) are not sent again. Versions\n\
            are immutable: pushing an existing NAME:VERSION fails; push a new version.",
        after_help = "Examples:\n  \
            drover artifact push app:1.0 build/app-amd64 build/app-arm64\n  \
            drover artifact push app:1.1 \\\n      \
            build/app@linux/amd64/v3+gnu build/app-v1@linux/amd64+gnu\n  \
            drover artifact push model:7 weights.bin@any"
    )]
    Push {
        /// The artifact's name and version, e.g. app:1.2.0.
        #[arg(value_name = "NAME:VERSION")]
        reference: ArtifactRef,
        /// A file to upload, optionally with the platform it runs on after '@'.
        #[arg(value_name = "FILE[@PLATFORM]", required = true)]
        files: Vec<String>,
    },
    /// List artifact versions.
    Ls,
    /// Show an artifact version: its variants, their platforms, digests and sizes.
    Inspect {
        /// The artifact version to show.
        #[arg(value_name = "NAME:VERSION")]
        reference: ArtifactRef,
    },
    /// Remove an artifact version, and the stored files no other artifact uses.
    ///
    /// An artifact that a running job uses cannot be removed; stop the job first.
    Rm {
        /// The artifact version to remove.
        #[arg(value_name = "NAME:VERSION")]
        reference: ArtifactRef,
    },
}

#[derive(Args)]
#[command(after_help = "Examples:
  drover logs web               # every task of job web, [INDEX] before each
                                # line when it has several
  drover logs web/1             # the task of index 1
  drover logs -f --tail 20 web  # the last 20 lines of each stream, then follow
  drover logs -f --tail 0 web   # only what comes from now on
  drover logs --since 10m web   # what was written in the last 10 minutes
  drover logs --since 2026-12-03T10:00:00Z web
  drover logs -t web            # the time before each line (per chunk)
  drover logs -o json web       # one JSON object per chunk of output (NDJSON)")]
struct LogsArgs {
    /// A job name, JOB/INDEX for the current task of that index, or a task id (a unique
    /// prefix is enough).
    target: String,
    /// Keep printing new output until the job or task ends.
    #[arg(short, long)]
    follow: bool,
    /// Start at the last N lines of each task's stdout and stderr (0: only new output,
    /// with -f).
    #[arg(long, value_name = "N")]
    tail: Option<u64>,
    /// Start each stream at its first line written at or after this: a duration
    /// before now (10m, 1h30m) or an RFC 3339 time (2026-12-03T10:00:00Z). With
    /// --tail, the last N lines of what is after it.
    #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
    since: Option<drover_core::logtime::Since>,
    /// Put the time each line was written before it, after any [INDEX] (RFC 3339 in
    /// UTC, e.g. 2026-12-03T10:00:00.123Z; `-` when unknown). Times are those of the
    /// chunks of output the agent read, so to within a fraction of a second, not
    /// exact per line.
    #[arg(short, long)]
    timestamps: bool,
    /// Show what the agent wrote while preparing the task (downloads, unpacking, the
    /// Python environment's build) instead of the task's output.
    #[arg(long)]
    prepare: bool,
}

fn parse_since(s: &str) -> Result<drover_core::logtime::Since, String> {
    s.parse()
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("expected a duration like 500ms or 15s: {e}"))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn main() {
    // The process runtime re-executes this binary as the shim that watches a task's
    // process; that path must not start a tokio runtime or parse the normal CLI.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(drover_runtime::shim::SUBCOMMAND) {
        match drover_runtime::shim::parse_args(&args[2..]) {
            Ok(shim) => std::process::exit(drover_runtime::shim::run_shim(&shim)),
            Err(e) => {
                eprintln!("drover {}: {e}", drover_runtime::shim::SUBCOMMAND);
                std::process::exit(2);
            }
        }
    }
    // A built-in pipeline vertex is a blocking program of the data protocol; like the
    // shim it starts no async runtime.
    if args.get(1).map(String::as_str) == Some(vertex::SUBCOMMAND) {
        std::process::exit(vertex::run(&args[2..]));
    }
    let cli = match parse(&args) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && asks_for_plan(&args) => {
            if let Err(printing) = e.print() {
                eprintln!("error: {e} ({printing})");
            }
            std::process::exit(code::ERROR);
        }
        Err(e) => e.exit(),
    };
    let detailed = plans(&cli.command);
    init_tracing(&cli.command);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(code::ERROR);
        }
    };
    let result = rt.block_on(dispatch(cli));
    let status = match result {
        Ok(code) => code,
        // Whoever read the output has all they wanted; nothing to report.
        Err(e) if output::is_reader_gone(&e) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<client::ApiError>() {
                _ if detailed => code::ERROR,
                Some(a) if a.status == 404 => code::NOT_FOUND,
                Some(a) if a.status == 401 || a.status == 403 => code::UNAUTHORIZED,
                _ if e.downcast_ref::<UsageError>().is_some() => code::USAGE,
                _ => code::ERROR,
            }
        }
    };
    // Background tasks (an agent's reconnect loop, a server) must not keep the process
    // alive past its answer.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(status);
}

fn init_tracing(cmd: &Cmd) {
    // Long-running commands log at info; client commands stay quiet unless asked.
    // The platform verifier logs every certificate it refuses as an error of its own;
    // Drover reports the refusal itself, saying what to do, so its line is only noise.
    let default = match cmd {
        Cmd::Up(_) | Cmd::Server(_) | Cmd::Agent(_) => "info,rustls_platform_verifier=off",
        _ => "warn,rustls_platform_verifier=off",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // DROVER_LOG_FORMAT=json gives one JSON object per line, for log collectors.
    let _ = match std::env::var("DROVER_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().try_init(),
        _ => builder.try_init(),
    };
}

/// The server and token to talk to, if any is configured.
/// The config file's context this command uses (named by --context or DROVER_CONTEXT,
/// else the current one), or an empty one when the file has none.
fn picked_context(cli: &Cli) -> Result<config::Context> {
    let cfg = config::load()?;
    Ok(cfg
        .pick(cli.context.as_deref())?
        .map(|(_, c)| c.clone())
        .unwrap_or_default())
}

fn resolve(cli: &Cli) -> Result<Option<Client>> {
    let file = picked_context(cli)?;
    let server = cli.server.clone().or(file.server);
    let token = cli.token.clone().or(file.token);
    let project = cli.project.clone().or(file.project);
    let tls = match &server {
        Some(s) if s.starts_with("https://") => {
            let from_file = || {
                config::config_path()
                    .map(|p| format!("server_fingerprint: in {}", p.display()))
                    .unwrap_or_else(|| "server_fingerprint: in the config file".into())
            };
            let pin = match (&cli.server_fingerprint, &file.server_fingerprint) {
                (Some(p), _) => Some((p.clone(), "--server-fingerprint".to_string())),
                (None, Some(p)) => Some((p.clone(), from_file())),
                (None, None) => None,
            };
            let ca = cli.ca.clone().or(file.ca);
            Some(client_tls(ca.as_deref(), pin)?)
        }
        _ => None,
    };
    match (server, token) {
        (Some(s), Some(t)) => Ok(Some(
            Client::new(&s, &t, tls)?.in_project(project.as_deref())?,
        )),
        (Some(s), None) => bail!("no token for {s}: pass --token or set DROVER_TOKEN"),
        (None, _) => Ok(None),
    }
}

/// How to trust an https:// server, from a CA file and a pin (with where the pin came
/// from, for its error). A file that cannot be read or a pin that is not a fingerprint
/// is a usage error naming its flag.
fn client_tls(ca: Option<&Path>, pin: Option<(String, String)>) -> Result<drover_tls::ClientTls> {
    let pin = match pin {
        Some((text, source)) => Some(
            text.parse::<drover_tls::Fingerprint>()
                .map_err(|e| UsageError(format!("{source}: {e}")))?,
        ),
        None => None,
    };
    drover_tls::ClientTls::new(ca, pin).map_err(|e| match e {
        drover_tls::TlsError::Read { .. } | drover_tls::TlsError::Content { .. } => {
            UsageError(e.to_string()).into()
        }
        other => anyhow::Error::new(other),
    })
}

fn require(cli: &Cli) -> Result<Client> {
    resolve(cli)?.context("no Drover server configured: start one with `drover up`, or pass --server and --token (or DROVER_SERVER and DROVER_TOKEN)")
}

/// Parses the command line into a `Cli`, refusing a global flag given to a command that
/// does not read it (see `globals`), with clap's usage error (exit 2).
fn parse(args: &[String]) -> Result<Cli, clap::Error> {
    use clap::FromArgMatches;
    let mut cmd = globals::command::<Cli>();
    let matches = cmd.try_get_matches_from_mut(args)?;
    if let Some((flag, name)) = globals::refused(&matches) {
        let what = if flag.starts_with("-o") {
            format!("`drover {name}` has no JSON output; leave out -o")
        } else {
            format!("`drover {name}` does not use {flag}; leave it out")
        };
        return Err(cmd.error(clap::error::ErrorKind::ArgumentConflict, what));
    }
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

async fn dispatch(cli: Cli) -> Result<i32> {
    match &cli.command {
        Cmd::Run(a) => run(&cli, a).await,
        Cmd::Up(a) => up(a).await,
        Cmd::Server(a) => server(a).await,
        Cmd::Agent(a) => agent(&cli, a).await,
        Cmd::Job(j) => {
            let c = require(&cli)?;
            job(&c, cli.output, j).await
        }
        Cmd::Task(TaskCmd::Ls { job, all, watch }) => {
            let c = require(&cli)?;
            let attempts = if *all {
                output::Attempts::All
            } else {
                output::Attempts::Latest
            };
            let show = async || -> Result<Shown> {
                let tasks = if *all {
                    c.tasks_of_all_versions(job.as_deref()).await?
                } else {
                    c.tasks(job.as_deref()).await?
                };
                output::tasks(cli.output, &tasks, attempts)?;
                Ok(Shown::More)
            };
            repeat(*watch, show).await
        }
        Cmd::Task(TaskCmd::Status { id, events }) => {
            let c = require(&cli)?;
            output::task_status(cli.output, &c.task(id).await?, events.events)?;
            Ok(0)
        }
        Cmd::Node(NodeCmd::Ls) => {
            let c = require(&cli)?;
            output::nodes(cli.output, &c.nodes().await?)?;
            Ok(0)
        }
        Cmd::Node(NodeCmd::Rm { node }) => {
            let c = require(&cli)?;
            let removed = c.remove_node(node).await?;
            match cli.output {
                Output::Json => output::json(&removed)?,
                Output::Table => outln!(
                    "node {} ({}) removed",
                    removed.node.info.name,
                    removed.node.id
                )?,
            }
            Ok(0)
        }
        Cmd::Env(EnvCmd::Ls { node }) => {
            let c = require(&cli)?;
            output::envs(cli.output, &c.envs(node.as_deref()).await?)?;
            Ok(0)
        }
        Cmd::Env(EnvCmd::Prune { node }) => {
            let c = require(&cli)?;
            let asked = c.prune_envs(node.as_deref()).await?;
            match cli.output {
                Output::Json => output::json(&asked)?,
                Output::Table => {
                    let nodes: Vec<&str> = asked["nodes"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
                        .unwrap_or_default();
                    eprintln!(
                        "asked {} node(s) to remove unused environments: {}; `drover env ls` shows the result after their next heartbeat",
                        nodes.len(),
                        nodes.join(", ")
                    );
                }
            }
            Ok(0)
        }
        Cmd::Logs(a) => {
            let c = require(&cli)?;
            logs(&c, cli.output, a).await
        }
        Cmd::Project(ProjectCmd::Create { name }) => {
            let c = require(&cli)?;
            let p = c.create_project(name).await?;
            match cli.output {
                Output::Json => output::json(&p)?,
                Output::Table => eprintln!(
                    "project {} created; give it a token with `drover token create --project {} --role write`",
                    p.name, p.name
                ),
            }
            Ok(0)
        }
        Cmd::Project(ProjectCmd::Ls) => {
            let c = require(&cli)?;
            output::projects(cli.output, &c.projects().await?)?;
            Ok(0)
        }
        Cmd::Token(TokenCmd::Create { role, name, save }) => {
            let c = require(&cli)?;
            // The token's project is the one the client acts in (sent with every
            // request, from --project, DROVER_PROJECT or the config file), and without
            // one the caller's own: the token's for a project admin, `default` for the
            // cluster admin.
            let created = c
                .create_token(&drover_core::auth::NewToken {
                    project: None,
                    role: role.role(),
                    name: name.clone(),
                })
                .await?;
            match cli.output {
                Output::Json => output::json(&created)?,
                // Only the secret goes to stdout, so `$(drover token create ...)` is the
                // token; what it is goes to stderr.
                Output::Table => {
                    outln!("{}", created.token)?;
                    eprintln!(
                        "created {} token {} ({}) for project {}; it is shown only now",
                        created.view.role, created.view.id, created.view.name, created.view.project
                    );
                }
            }
            if let Some(ctx) = save {
                save_token_context(&cli, ctx, &created)?;
            }
            Ok(0)
        }
        Cmd::Context(cmd) => context(&cli, cmd),
        Cmd::Token(TokenCmd::Ls) => {
            let c = require(&cli)?;
            output::tokens(cli.output, &c.tokens().await?)?;
            Ok(0)
        }
        Cmd::Token(TokenCmd::Revoke { id }) => {
            let c = require(&cli)?;
            let t = c.revoke_token(id).await?;
            match cli.output {
                Output::Json => output::json(&t)?,
                Output::Table => eprintln!(
                    "revoked token {} ({}) of project {}",
                    t.id, t.name, t.project
                ),
            }
            Ok(0)
        }
        Cmd::Artifact(a) => {
            let c = require(&cli)?;
            artifact(&c, cli.output, a).await
        }
        Cmd::Pipeline(p) => {
            let c = require(&cli)?;
            pipeline::run(&c, cli.output, p).await
        }
        Cmd::Version => version(&cli).await,
        Cmd::Completions { shell } => {
            // Generated into memory first: clap_complete panics when its writer fails,
            // and a closed stdout must end the command quietly.
            let mut script = Vec::new();
            clap_complete::generate(
                *shell,
                &mut globals::command::<Cli>(),
                "drover",
                &mut script,
            );
            output::write_to(std::io::stdout().lock(), &script, "stdout")?;
            Ok(0)
        }
    }
}

fn parse_memory(s: &Option<String>, flag: &str) -> Result<Option<ByteSize>> {
    s.as_deref()
        .map(|m| ByteSize::parse(m).map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
        .transpose()
}

async fn run(cli: &Cli, a: &RunArgs) -> Result<i32> {
    let runtime = match (&a.runtime, &a.image) {
        (Some(r), _) => RuntimeKind::parse(r).map_err(|e| anyhow::anyhow!("--runtime: {e}"))?,
        (None, Some(_)) => RuntimeKind::Docker,
        (None, None) => RuntimeKind::Process,
    };
    let mut resources = Resources::default();
    if let Some(c) = a.cpu {
        resources.cpu = c;
    }
    if let Some(m) = parse_memory(&a.memory, "memory")? {
        resources.memory = m;
    }
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("run-{}", hex::encode(rand::random::<[u8; 4]>())));
    if a.file.is_none() && a.command.is_empty() {
        // A usage mistake, so the usage exit code, as clap gives for its own.
        eprintln!(
            "error: drover run needs a command after `--` (e.g. drover run -- echo hi), or a local executable (drover run ./app -- args)"
        );
        return Ok(2);
    }
    let mut spec = JobSpec::new(name, a.command.clone());
    spec.kind = if a.service {
        JobKind::Service
    } else {
        JobKind::Batch
    };
    spec.count = a.count;
    spec.runtime = runtime;
    spec.image = a.image.clone();
    spec.env = a.env.iter().cloned().collect();
    spec.resources = resources;
    spec.restart = drover_core::spec::RestartPolicy {
        attempts: a.retries,
        ..Default::default()
    };
    // One-off runs under generated names would otherwise pile up for a day each.
    if a.name.is_none() {
        spec.retention = Some(drover_core::quantity::Dur::from_secs(3600));
    }
    let local = match &a.file {
        Some(path) => {
            let (r, name) = local_artifact(path).await?;
            spec.artifact = Some(r.clone());
            // The arguments go to the uploaded program, found in the task's directory.
            if !a.command.is_empty() {
                spec.command = std::iter::once(format!("./{name}"))
                    .chain(a.command.iter().cloned())
                    .collect();
            }
            Some((r, path.clone()))
        }
        None => None,
    };
    let mode = match (a.stdin, a.no_stdin) {
        (true, _) => input::Mode::Always,
        (false, true) => input::Mode::Never,
        (false, false) => input::Mode::Auto,
    };
    let input = input::read(mode).await?;
    if let Some(i) = &input {
        spec.stdin = Some(drover_core::spec::StdinInput {
            blob: i.digest.clone(),
            size: i.size,
        });
    }
    spec.validate()
        .map_err(|e| anyhow::anyhow!("invalid job: {e}"))?;
    let go = async |c: &Client, cluster: RunCluster| -> Result<i32> {
        if a.name.is_some() && !a.replace {
            refuse_silent_replace(c, &spec).await?;
        }
        if let Some((r, path)) = &local {
            upload_if_missing(c, r, path).await?;
        }
        if let Some(i) = &input {
            upload_if_absent(c, "stdin", i.file.path(), &i.digest, i.size).await?;
        }
        let code = run_on(c, &spec, cluster).await?;
        if a.rm {
            // The job has ended unless a second interrupt left it running, which the
            // server's refusal then says.
            if let Err(e) = c.delete_job(&spec.name).await {
                eprintln!("drover: --rm: job {} is kept: {e:#}", spec.name);
            }
        }
        Ok(code)
    };
    match resolve(cli)? {
        Some(c) => go(&c, RunCluster::Configured).await,
        None => {
            let cluster = cluster::Ephemeral::start(cluster::RuntimeOptions {
                docker: spec.runtime == RuntimeKind::Docker,
                ..Default::default()
            })
            .await?;
            let c = Client::new(&cluster.server.url(), &cluster.token, None)?;
            let result = go(&c, RunCluster::Throwaway).await;
            cluster.stop().await;
            result
        }
    }
}

/// Refuses to let `drover run --name` turn an existing job into one of another kind or
/// runtime (a docker service into a batch process job, say) without `--replace`: a
/// typo in a name must not silently take a service down.
async fn refuse_silent_replace(c: &Client, spec: &JobSpec) -> Result<()> {
    let current = match c.job(&spec.name).await {
        Ok(v) => v,
        Err(e)
            if e.downcast_ref::<client::ApiError>()
                .is_some_and(|a| a.status == 404) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let old = &current.job.spec;
    if old.kind == spec.kind && old.runtime == spec.runtime {
        return Ok(());
    }
    bail!(
        "job {} is a {} job of the {} runtime ({}, version {}); this would replace it with a {} job of the {} runtime: pass --replace to do that, or choose another --name",
        spec.name,
        old.kind,
        old.runtime,
        current.job.status,
        current.job.version,
        spec.kind,
        spec.runtime
    )
}

/// The artifact a local file is run as: named after the file, versioned by its content,
/// so running the same build again uploads nothing and a rebuilt one is a new version.
async fn local_artifact(path: &Path) -> Result<(ArtifactRef, String)> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("program");
    let name: String = file_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_start_matches(['-', '_', '.'])
        .chars()
        .take(100)
        .collect();
    let name = if name.is_empty() {
        "program".to_string()
    } else {
        name
    };
    let (digest, _) = hash_file(path).await?;
    let r: ArtifactRef = format!("{name}:{}", &digest.hex()[..16])
        .parse()
        .map_err(anyhow::Error::msg)?;
    Ok((r, name))
}

/// Pushes a local file as artifact `r` unless that version is already there.
async fn upload_if_missing(c: &Client, r: &ArtifactRef, path: &Path) -> Result<()> {
    match c.artifact(r).await {
        Ok(_) => Ok(()),
        Err(e)
            if e.downcast_ref::<client::ApiError>()
                .is_some_and(|a| a.status == 404) =>
        {
            push_files(c, r, &[path.display().to_string()]).await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Where `drover run` runs its job, which decides what a second interrupt does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunCluster {
    /// A configured cluster: a second interrupt leaves the job running there.
    Configured,
    /// The throwaway cluster of this one command: nothing may outlive it, so a second
    /// interrupt kills the job's tasks at once rather than leaving them behind.
    Throwaway,
}

/// The signals that interrupt `drover run`: Ctrl-C, and the SIGTERM and SIGHUP that
/// `timeout`, CI runners and a closed terminal send.
struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> Result<Interrupts> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("listening for {name}"))
        };
        Ok(Interrupts {
            int: listen(SignalKind::interrupt(), "SIGINT")?,
            term: listen(SignalKind::terminate(), "SIGTERM")?,
            hup: listen(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// The next interrupt's name and the exit code the shell gives for it.
    async fn recv(&mut self) -> (&'static str, i32) {
        tokio::select! {
            _ = self.int.recv() => ("SIGINT", 128 + libc::SIGINT),
            _ = self.term.recv() => ("SIGTERM", 128 + libc::SIGTERM),
            _ = self.hup.recv() => ("SIGHUP", 128 + libc::SIGHUP),
        }
    }
}

/// Says on stderr why a job's tasks wait, each time the reason changes, so a job that
/// cannot be placed (`--cpu 64` on a 2-core node) is not a blank screen.
#[derive(Default)]
struct PendingNotes {
    last: String,
}

impl PendingNotes {
    fn event(&mut self, ev: &StreamEvent) {
        let StreamEvent::Task { state, reason, .. } = ev else {
            return;
        };
        if *state != drover_core::TaskState::Pending {
            self.last.clear();
            return;
        }
        if reason.is_empty() || *reason == self.last {
            return;
        }
        self.last = reason.clone();
        // A note only: with stderr closed there is nowhere to say it, and the output on
        // stdout goes on.
        if writeln!(std::io::stderr(), "drover: waiting: {reason}").is_err() {}
    }
}

/// Submits the job, streams its output and returns the exit code it ended with.
async fn run_on(c: &Client, spec: &JobSpec, cluster: RunCluster) -> Result<i32> {
    // Listened for before the job exists, so no interrupt can slip between the two.
    let mut interrupts = Interrupts::new()?;
    // `run` means run: an unchanged finished job of the same name runs again.
    let how = client::ApplyRequest {
        idempotency_key: None,
        rerun: true,
    };
    let applied = c.apply(spec, &how).await?;
    let name = applied.job.job.name.clone();
    let path = format!("/v1/jobs/{name}/logs");
    // While the task prepares (an environment build can take a while), a terminal shows
    // a spinner with the latest line of the preparation; the task's own output is
    // printed as it comes, as ever.
    let mut progress = PrepareProgress::new();
    let mut pending = PendingNotes::default();
    // Once stdout's reader is gone the output is dropped, while the follow goes on
    // until the job has stopped, so that a throwaway cluster is only taken down once
    // nothing of the job runs.
    let gone = std::sync::atomic::AtomicBool::new(false);
    let query = client::StreamQuery {
        follow: true,
        logs: "all",
        tail: None,
        since: None,
        timestamps: false,
    };
    let follow = c.stream(&path, &query, |ev| {
        pending.event(&ev);
        if gone.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        match progress.event(ev) {
            Err(e) if output::is_reader_gone(&e) => {
                gone.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            r => r,
        }
    });
    tokio::pin!(follow);
    // The interrupt that is stopping the job, if any, with the exit code it gives.
    let mut interrupted: Option<i32> = None;
    let mut reader_gone = false;
    loop {
        tokio::select! {
            r = &mut follow => {
                r?;
                break;
            }
            (signal, code) = interrupts.recv() => {
                if interrupted.is_none() {
                    eprintln!("drover: {signal}, stopping job {name} ({signal} or Ctrl-C again to {})",
                        match cluster {
                            RunCluster::Configured => "leave it running",
                            RunCluster::Throwaway => "kill it now",
                        });
                    interrupted = Some(code);
                    c.stop_job(&name, false).await?;
                    continue;
                }
                match cluster {
                    RunCluster::Configured => {
                        eprintln!("drover: {signal} again, leaving job {name} running");
                        return Ok(code);
                    }
                    RunCluster::Throwaway => {
                        eprintln!("drover: {signal} again, killing job {name}'s tasks");
                        c.stop_job(&name, true).await?;
                    }
                }
            }
            // Like a program whose output pipe closed, the job ends. A failed write
            // sets `gone` at once; a quiet job's closed pipe is seen by the poll.
            () = output::stdout_closed(), if !reader_gone => {
                reader_gone = true;
                c.stop_job(&name, false).await?;
            }
        }
    }
    if reader_gone || gone.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(output::ReaderGone.into());
    }
    let view = c.job(&name).await?;
    let (status, exit, reason) = (view.job.status, view.job.exit, view.job.reason);
    Ok(match status {
        JobStatus::Complete => 0,
        JobStatus::Running => code::ERROR,
        JobStatus::Stopped => interrupted.unwrap_or(130),
        JobStatus::Failed => {
            if !reason.is_empty() {
                eprintln!("drover: job {name} failed: {reason}");
            }
            exit_code(exit.as_ref())
        }
    })
}

/// A spec file's name for errors, its text, and the directory its relative paths
/// (a working_dir) start from. `-` is standard input, whose paths start from the
/// current directory.
pub(crate) fn read_spec_file(file: &Path) -> Result<(String, String, PathBuf)> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading the spec from standard input")?;
        return Ok(("<stdin>".to_string(), text, PathBuf::from(".")));
    }
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {name}"))?;
    let base = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((name, text, base))
}

/// `drover version`: this client's, and the configured server's when there is one. A
/// server that cannot be reached is said so, with exit code 1.
async fn version(cli: &Cli) -> Result<i32> {
    #[derive(serde::Serialize)]
    struct Build {
        version: String,
        commit: String,
    }
    #[derive(serde::Serialize)]
    struct Versions {
        client: Build,
        #[serde(skip_serializing_if = "Option::is_none")]
        server: Option<Build>,
        #[serde(skip_serializing_if = "Option::is_none")]
        server_url: Option<String>,
    }
    let client = Build {
        version: drover_core::VERSION.to_string(),
        commit: COMMIT.to_string(),
    };
    let (server, url) = match resolve(cli)? {
        Some(c) => {
            let h = c.health().await?;
            let build = Build {
                version: h.version,
                commit: h.commit.unwrap_or_else(|| "unknown".into()),
            };
            (Some(build), Some(c.base().to_string()))
        }
        None => (None, None),
    };
    if cli.output == Output::Json {
        output::json(&Versions {
            client,
            server,
            server_url: url,
        })?;
        return Ok(0);
    }
    outln!(
        "client: drover {} (commit {})",
        client.version,
        client.commit
    )?;
    match (server, url) {
        (Some(s), Some(url)) => outln!(
            "server: drover {} (commit {}) at {url}",
            s.version,
            s.commit
        )?,
        _ => outln!("server: none configured (`drover up` starts one)")?,
    }
    Ok(0)
}

/// The context `drover up` saves its cluster as: `local` on the default address,
/// `local-PORT` on another port of loopback, else `up-HOST-PORT`.
fn up_context_name(addr: SocketAddr) -> String {
    match (addr.ip().is_loopback(), addr.port()) {
        (true, 7700) => "local".to_string(),
        (true, port) => format!("local-{port}"),
        (false, port) => format!(
            "up-{}-{port}",
            addr.ip().to_string().replace([':', '.'], "-")
        ),
    }
}

/// Keeps a token just made as a context of its own: the server and trust settings in
/// use, the token's project, the new secret.
fn save_token_context(
    cli: &Cli,
    name: &str,
    created: &drover_core::auth::CreatedToken,
) -> Result<()> {
    let base = picked_context(cli)?;
    let context = config::Context {
        server: cli.server.clone().or(base.server),
        token: Some(created.token.clone()),
        project: Some(created.view.project.to_string()),
        ca: cli.ca.clone().or(base.ca),
        server_fingerprint: cli.server_fingerprint.clone().or(base.server_fingerprint),
    };
    let ((), path) = config::update(|cfg| {
        cfg.put(name, context);
        Ok(())
    })?;
    eprintln!(
        "saved as context {name} in {}, now the current one (`drover context use` switches back)",
        path.display()
    );
    Ok(())
}

/// `drover context ...`: the CLI config's contexts.
fn context(cli: &Cli, cmd: &ContextCmd) -> Result<i32> {
    // `pick` with a name is the check that a context exists; its error lists the ones
    // that do.
    match cmd {
        ContextCmd::Ls => {
            let cfg = config::load()?;
            output::contexts(cli.output, &cfg)?;
        }
        ContextCmd::Use { name } => {
            config::update(|cfg| {
                cfg.pick(Some(name))?;
                cfg.current_context = Some(name.clone());
                Ok(())
            })?;
            eprintln!("using context {name}");
        }
        ContextCmd::Rm { name } => {
            config::update(|cfg| {
                cfg.pick(Some(name))?;
                cfg.contexts.remove(name);
                if cfg.current_context.as_deref() == Some(name) {
                    cfg.current_context = None;
                }
                Ok(())
            })?;
            eprintln!("removed context {name}");
        }
        ContextCmd::Rename { old, new } => {
            config::update(|cfg| {
                cfg.pick(Some(old))?;
                if cfg.contexts.contains_key(new) {
                    bail!("a context named {new:?} exists already; remove it first");
                }
                if let Some(ctx) = cfg.contexts.remove(old) {
                    cfg.contexts.insert(new.clone(), ctx);
                }
                if cfg.current_context.as_deref() == Some(old) {
                    cfg.current_context = Some(new.clone());
                }
                Ok(())
            })?;
            eprintln!("renamed context {old} to {new}");
        }
    }
    Ok(0)
}

/// `drover job plan` and `drover job apply --dry-run`: what applying the file would do,
/// changing nothing, with an exit code that says whether it would change anything.
async fn plan(c: &Client, out: Output, file: &Path) -> Result<i32> {
    let (name, text, base) = read_spec_file(file)?;
    let mut spec = JobSpec::from_yaml(&text, &name)?;
    // A local working_dir is packed for its digest, which is what a change of its
    // files changes in the spec, but not uploaded: a plan leaves the server as it is.
    let packed = resolve_working_dir(c, &mut spec.runtime_env, &base, false).await?;
    let plan = c.plan(&spec).await?;
    match out {
        Output::Json => output::json(&plan)?,
        Output::Table => output::plan(&plan, packed.as_deref())?,
    }
    Ok(if plan.changes_something() {
        code::CHANGES
    } else {
        0
    })
}

/// Whether a command is a plan, whose exit code 2 means "changes" (see `code::CHANGES`).
fn plans(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Job(JobCmd::Plan { .. }) | Cmd::Job(JobCmd::Apply { dry_run: true, .. })
    )
}

/// Whether a command line that clap refused asks for a plan, so that its usage error
/// exits 1 rather than clap's 2, which a plan's caller would read as "changes". A
/// guess from the words alone, since clap could not parse them.
fn asks_for_plan(args: &[String]) -> bool {
    args.iter().any(|a| a == "--dry-run")
        || args.windows(2).any(|w| w[0] == "job" && w[1] == "plan")
}

/// The end of an apply or a revert: waits for the job unless `--detach` (or `wanted`
/// is false, for a finished job applied unchanged), says where it got on a terminal,
/// and prints the apply's answer with `-o json`.
async fn finish_apply(
    c: &Client,
    out: Output,
    res: &drover_core::api::ApplyResponse,
    wait: &WaitArgs,
    wanted: bool,
) -> Result<i32> {
    let name = &res.job.job.name;
    if wanted
        && let Some(reached) = wait.wait(c, name, wait::Goal::Applied).await?
        && out == Output::Table
    {
        let rolled = if rolls_out(res) {
            format!("version {} rolled out: ", res.job.job.version)
        } else {
            String::new()
        };
        outln!(
            "job {name}: {rolled}{}",
            wait::summarise(&reached.job, &reached.tasks)
        )?;
    }
    if out == Output::Json {
        output::json(res)?;
    }
    Ok(0)
}

/// Whether an apply started a rollout (a running service's new version, replacing its
/// tasks a few at a time).
fn rolls_out(res: &drover_core::api::ApplyResponse) -> bool {
    res.result.starts_with("rolling out") && res.job.job.rollout.is_some()
}

/// Whether a watched listing can change any more.
enum Shown {
    More,
    /// What it shows has ended (a finished job): the watch stops.
    Final,
}

/// Shows a listing once, or with `--watch` every second until what it shows has ended,
/// Ctrl-C or the reader goes away. On a terminal each showing replaces the last on the
/// screen; elsewhere (a file, a pipe) each is printed after a line with its time.
async fn repeat(watch: bool, mut show: impl AsyncFnMut() -> Result<Shown>) -> Result<i32> {
    use std::io::IsTerminal;
    if !watch {
        show().await?;
        return Ok(0);
    }
    let tty = std::io::stdout().is_terminal();
    // Listened for once, before the first showing, so a Ctrl-C during a request is not
    // missed between two waits.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("listening for SIGINT")?;
    loop {
        if tty {
            // Home the cursor and clear the screen, as `watch` does.
            output::out("\x1b[H\x1b[2J")?;
        } else {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            outln!("--- {now}")?;
        }
        if let Shown::Final = show().await? {
            return Ok(0);
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = interrupt.recv() => return Ok(0),
            () = output::stdout_closed() => return Err(output::ReaderGone.into()),
        }
    }
}

/// How a finished job ended, for "job NAME has already ...": `stopped`, `completed`,
/// `failed`.
fn ended_as(job: &drover_core::api::JobView) -> String {
    match job.job.status {
        JobStatus::Complete => "completed".to_string(),
        other => other.to_string(),
    }
}

/// The shell's convention: the exit code, or 128 + the signal number.
fn exit_code(exit: Option<&Exit>) -> i32 {
    match exit {
        Some(Exit { code: Some(c), .. }) if *c != 0 => *c,
        Some(Exit {
            signal: Some(s), ..
        }) => 128 + signal_number(s).unwrap_or(1),
        _ => code::ERROR,
    }
}

fn signal_number(name: &str) -> Option<i32> {
    [
        ("SIGHUP", 1),
        ("SIGINT", 2),
        ("SIGQUIT", 3),
        ("SIGABRT", 6),
        ("SIGKILL", 9),
        ("SIGSEGV", 11),
        ("SIGPIPE", 13),
        ("SIGTERM", 15),
    ]
    .iter()
    .find(|(n, _)| *n == name)
    .map(|(_, v)| *v)
}

/// Shows a job's preparation on a terminal as a spinner with its latest line; prints
/// nothing of it elsewhere, so that piped output is the task's alone.
struct PrepareProgress {
    bar: Option<indicatif::ProgressBar>,
    tty: bool,
}

impl PrepareProgress {
    fn new() -> PrepareProgress {
        use std::io::IsTerminal;
        PrepareProgress {
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn event(&mut self, ev: StreamEvent) -> Result<()> {
        match &ev {
            StreamEvent::Log {
                stream: LogStream::Prepare,
                data,
                ..
            } => {
                if !self.tty {
                    return Ok(());
                }
                let bar = self.bar.get_or_insert_with(|| {
                    let bar = indicatif::ProgressBar::new_spinner();
                    if let Ok(style) =
                        indicatif::ProgressStyle::with_template("{spinner} preparing: {wide_msg}")
                    {
                        bar.set_style(style);
                    }
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                    bar
                });
                if let Some(line) = data.lines().rev().find(|l| !l.trim().is_empty()) {
                    bar.set_message(line.trim().to_string());
                }
                Ok(())
            }
            _ => {
                // Anything else means the preparation is over (or never showed).
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                print_event(ev)
            }
        }
    }
}

fn print_event(ev: StreamEvent) -> Result<()> {
    if let StreamEvent::Log {
        stream,
        data,
        dropped,
        ..
    } = ev
    {
        if dropped > 0 {
            // On stderr, so that a program reading the task's stdout is not fed a line
            // the task never wrote.
            eprintln!(
                "drover: {dropped} bytes of {} dropped here: the job's logs.max_size keeps only a task's latest output",
                stream.as_str()
            );
        }
        // A closed stdout (e.g. piped into `head`) ends the stream with `ReaderGone`,
        // which the command turns into a quiet end.
        match stream {
            LogStream::Stdout => {
                output::write_to(std::io::stdout().lock(), data.as_bytes(), "stdout")?
            }
            LogStream::Stderr | LogStream::Prepare => {
                output::write_to(std::io::stderr().lock(), data.as_bytes(), "stderr")?
            }
        }
    }
    Ok(())
}

async fn logs(c: &Client, out: Output, a: &LogsArgs) -> Result<i32> {
    let (path, several) = logs_target(c, &a.target).await?;
    let query = client::StreamQuery {
        follow: a.follow,
        logs: if a.prepare { "prepare" } else { "output" },
        tail: a.tail,
        since: a.since,
        // JSON always carries the times: a program reading it may want them.
        timestamps: a.timestamps || out == Output::Json,
    };
    let mut pending = PendingNotes::default();
    let mut printer = LogPrinter::new(out, several, a.timestamps);
    let follow = c.stream(&path, &query, |ev| {
        pending.event(&ev);
        printer.event(ev)
    });
    tokio::select! {
        r = follow => r?,
        () = output::stdout_closed() => return Err(output::ReaderGone.into()),
    }
    Ok(0)
}

/// The stream path of `drover logs TARGET`, and whether its lines come from several
/// tasks. TARGET is a job name, JOB/INDEX (the current task of that index: the one not
/// yet ended, else the latest attempt) or a task id or unique prefix of one.
async fn logs_target(c: &Client, target: &str) -> Result<(String, bool)> {
    if let Some((job, index)) = target.split_once('/') {
        let index: u32 = index.parse().map_err(|_| {
            UsageError(format!(
                "{target}: expected JOB/INDEX with a task index after the slash, e.g. web/0"
            ))
        })?;
        let tasks = c.tasks(Some(job)).await?;
        let of_index = tasks.iter().filter(|t| t.task.index == index);
        let chosen = of_index.max_by_key(|t| (!t.task.state.is_terminal(), t.task.created_at));
        let Some(t) = chosen else {
            let mut indexes: Vec<u32> = tasks.iter().map(|t| t.task.index).collect();
            indexes.sort_unstable();
            indexes.dedup();
            let have: Vec<String> = indexes.iter().map(u32::to_string).collect();
            bail!(
                "job {job} has no task of index {index} (its indexes: {})",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            );
        };
        return Ok((format!("/v1/tasks/{}/logs", t.task.id), false));
    }
    if target.starts_with("task-") {
        return Ok((format!("/v1/tasks/{target}/logs"), false));
    }
    match c.job(target).await {
        Ok(j) => Ok((format!("/v1/jobs/{target}/logs"), j.job.spec.count > 1)),
        Err(e) => match c.task(target).await {
            Ok(t) => Ok((format!("/v1/tasks/{}/logs", t.task.id), false)),
            // A prefix of several tasks' ids says which, rather than that no job has
            // that name.
            Err(te)
                if te
                    .downcast_ref::<client::ApiError>()
                    .is_some_and(|a| a.code == "ambiguous") =>
            {
                Err(te)
            }
            Err(_) => Err(e),
        },
    }
}

/// Prints a log stream: the output as the tasks wrote it, each line after `[INDEX] `
/// when the lines come from several tasks and then its time with `--timestamps`, or
/// with `-o json` one JSON object per event (NDJSON), keepalives left out.
struct LogPrinter {
    out: Output,
    prefix: bool,
    timestamps: bool,
    /// Per task and stream, whether the next byte starts a line; a chunk can end in the
    /// middle of one.
    at_line_start: HashMap<(drover_core::TaskId, LogStream), bool>,
}

/// What `--timestamps` puts before a line whose time is unknown, as wide as a time.
const UNKNOWN_TIME: &str = "-                       ";

impl LogPrinter {
    fn new(out: Output, prefix: bool, timestamps: bool) -> LogPrinter {
        LogPrinter {
            out,
            prefix,
            timestamps,
            at_line_start: HashMap::new(),
        }
    }

    fn event(&mut self, ev: StreamEvent) -> Result<()> {
        if self.out == Output::Json {
            if matches!(ev, StreamEvent::Keepalive { .. }) {
                return Ok(());
            }
            let line = serde_json::to_string(&ev)?;
            return outln!("{line}");
        }
        if !self.prefix && !self.timestamps {
            return print_event(ev);
        }
        match ev {
            StreamEvent::Log {
                task_id,
                index,
                stream,
                offset,
                data,
                dropped,
                time,
            } => {
                let start = self
                    .at_line_start
                    .entry((task_id.clone(), stream))
                    .or_insert(true);
                let mut prefix = String::new();
                if self.prefix {
                    prefix.push_str(&format!("[{index}] "));
                }
                if self.timestamps {
                    match time {
                        Some(at) => {
                            prefix.push_str(&drover_core::logtime::format_rfc3339_millis(at))
                        }
                        None => prefix.push_str(UNKNOWN_TIME),
                    }
                    prefix.push(' ');
                }
                let prefixed = prefix_lines(&data, &prefix, start);
                print_event(StreamEvent::Log {
                    task_id,
                    index,
                    stream,
                    offset,
                    data: prefixed,
                    dropped,
                    time,
                })
            }
            other => print_event(other),
        }
    }
}

/// `data` with `prefix` before each line; `at_start` says whether `data` starts a line,
/// and is left saying whether the next chunk does.
fn prefix_lines(data: &str, prefix: &str, at_start: &mut bool) -> String {
    let mut out = String::with_capacity(data.len() + prefix.len());
    for piece in data.split_inclusive('\n') {
        if *at_start {
            out.push_str(prefix);
        }
        out.push_str(piece);
        *at_start = piece.ends_with('\n');
    }
    out
}

async fn job(c: &Client, out: Output, cmd: &JobCmd) -> Result<i32> {
    match cmd {
        JobCmd::Apply {
            dry_run: true,
            file,
            ..
        }
        | JobCmd::Plan { file } => plan(c, out, file).await,
        JobCmd::Apply {
            file,
            idempotency_key,
            wait,
            dry_run: false,
        } => {
            let (name, text, base) = read_spec_file(file)?;
            let mut spec = JobSpec::from_yaml(&text, &name)?;
            resolve_working_dir(c, &mut spec.runtime_env, &base, true).await?;
            let how = client::ApplyRequest {
                idempotency_key: idempotency_key.clone(),
                rerun: false,
            };
            let res = c.apply(&spec, &how).await?;
            let job = &res.job.job;
            let finished = res.result == "unchanged" && job.status.is_final();
            if out == Output::Table {
                match job.rollout.as_ref().filter(|_| rolls_out(&res)) {
                    Some(r) => outln!(
                        "job {}: {} (from version {})",
                        job.name,
                        res.result,
                        r.from_version
                    )?,
                    None => outln!("job {} {} (version {})", job.name, res.result, job.version)?,
                }
                if finished {
                    outln!(
                        "it has {}; `drover job rerun {}` runs it again",
                        job.status,
                        job.name
                    )?;
                }
            }
            finish_apply(c, out, &res, wait, !finished).await
        }
        JobCmd::Rerun { name } => {
            let current = c.job(name).await?;
            if !current.job.status.is_final() {
                bail!(
                    "job {name} is still running (version {}); rerun is for finished jobs: stop it first, or change its spec and apply it",
                    current.job.version
                );
            }
            let how = client::ApplyRequest {
                idempotency_key: None,
                rerun: true,
            };
            let res = c.apply(&current.job.spec, &how).await?;
            match out {
                Output::Json => output::json(&res)?,
                Output::Table => outln!(
                    "job {} re-run as version {}",
                    res.job.job.name,
                    res.job.job.version
                )?,
            }
            Ok(0)
        }
        JobCmd::History { name } => {
            let versions = c.job_versions(name).await?;
            output::history(out, &versions)?;
            Ok(0)
        }
        JobCmd::Revert {
            name,
            version,
            wait,
        } => {
            let versions = c.job_versions(name).await?;
            let Some(old) = versions.iter().find(|v| v.job.version == *version) else {
                let kept: Vec<String> =
                    versions.iter().map(|v| v.job.version.to_string()).collect();
                bail!(
                    "job {name} has no version {version} kept (it has: {}); finished versions go after the server's retention",
                    kept.join(", ")
                );
            };
            // Run again even when that spec is the current one and has finished: a
            // revert is asked for explicitly.
            let how = client::ApplyRequest {
                idempotency_key: None,
                rerun: true,
            };
            let res = c.apply(&old.job.spec, &how).await?;
            let job = &res.job.job;
            if out == Output::Table {
                if rolls_out(&res) {
                    outln!(
                        "job {}: {} (the spec of version {version})",
                        job.name,
                        res.result
                    )?;
                } else {
                    outln!(
                        "job {} {} (version {}, the spec of version {version})",
                        job.name,
                        res.result,
                        job.version
                    )?;
                }
            }
            finish_apply(c, out, &res, wait, true).await
        }
        JobCmd::Rm { name } => {
            let removed = c.delete_job(name).await?;
            match out {
                Output::Json => output::json(&removed)?,
                Output::Table => outln!(
                    "removed job {} ({} version{}, {} task{})",
                    removed.name,
                    removed.versions,
                    if removed.versions == 1 { "" } else { "s" },
                    removed.tasks,
                    if removed.tasks == 1 { "" } else { "s" }
                )?,
            }
            Ok(0)
        }
        JobCmd::Ls => {
            output::jobs(out, &c.jobs().await?)?;
            Ok(0)
        }
        JobCmd::Status {
            name,
            watch,
            events,
        } => {
            let show = async || -> Result<Shown> {
                let job = c.job(name).await?;
                let tasks = c.tasks_with_events(name).await?;
                output::job_status(out, &job, &tasks, events.events)?;
                let ended =
                    job.job.status.is_final() && tasks.iter().all(|t| t.task.state.is_terminal());
                Ok(if ended { Shown::Final } else { Shown::More })
            };
            repeat(*watch, show).await
        }
        JobCmd::Stop { name, force, wait } => {
            let current = c.job(name).await?;
            let ended = current.job.status.is_final()
                && current.task_states.keys().all(|s| s.is_terminal());
            if ended && !*force {
                match out {
                    Output::Json => output::json(&current)?,
                    Output::Table => outln!("job {name} has already {}", ended_as(&current))?,
                }
                return Ok(0);
            }
            let job = c.stop_job(name, *force).await?;
            if out == Output::Table && wait.detach {
                if *force {
                    outln!("job {} stopping: its tasks are killed now", job.job.name)?
                } else {
                    outln!("job {} stopping", job.job.name)?
                }
            }
            let job = match wait.wait(c, name, wait::Goal::Stopped).await? {
                Some(reached) => {
                    if out == Output::Table {
                        outln!("job {name} {}", ended_as(&reached.job))?;
                    }
                    reached.job
                }
                None => job,
            };
            if out == Output::Json {
                output::json(&job)?;
            }
            Ok(0)
        }
    }
}

async fn artifact(c: &Client, out: Output, cmd: &ArtifactCmd) -> Result<i32> {
    match cmd {
        ArtifactCmd::Push { reference, files } => push(c, out, reference, files).await,
        ArtifactCmd::Ls => {
            output::artifacts(out, &c.artifacts().await?)?;
            Ok(0)
        }
        ArtifactCmd::Inspect { reference } => {
            output::artifact(out, &c.artifact(reference).await?)?;
            Ok(0)
        }
        ArtifactCmd::Rm { reference } => {
            let removed = c.delete_artifact(reference).await?;
            match out {
                Output::Json => output::json(&removed)?,
                Output::Table => outln!("artifact {reference} removed")?,
            }
            Ok(0)
        }
    }
}

/// Enough of a file to read any executable header Drover understands.
const HEADER_BYTES: u64 = 64 << 10;

/// Files above this size get a progress bar while they upload (on a terminal).
const PROGRESS_ABOVE: u64 = 1 << 20;

/// One file of a push, once read and hashed.
struct PushFile {
    path: PathBuf,
    platforms: Vec<BinaryPlatform>,
    digest: Digest,
    size: u64,
}

/// Splits `FILE[@PLATFORM]`. The platform is whatever follows the last '@' when it parses
/// as one and the part before it is a file; a file whose own name has an '@' in it is
/// taken whole.
fn split_file_arg(arg: &str) -> Result<(PathBuf, Option<BinaryPlatform>)> {
    if let Some((file, platform)) = arg.rsplit_once('@') {
        match platform.parse::<BinaryPlatform>() {
            Ok(p) if Path::new(file).is_file() => return Ok((PathBuf::from(file), Some(p))),
            Ok(_) => {}
            Err(e) if !Path::new(arg).exists() => {
                bail!(
                    "{arg}: {platform:?} is not a platform ({e}); write FILE@OS/ARCH, e.g. {file}@linux/amd64, or {file}@any"
                )
            }
            Err(_) => {}
        }
    }
    Ok((PathBuf::from(arg), None))
}

/// The platforms a file's header says it runs on.
fn detect_platforms(path: &Path) -> Result<Vec<BinaryPlatform>> {
    use std::io::Read;
    let name = path.display();
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(HEADER_BYTES).read_to_end(&mut head))
        .with_context(|| format!("reading {name}"))?;
    match drover_core::platform::detect_executable(&head) {
        Ok(exe) => Ok(exe.platforms),
        Err(e) => bail!(
            "{name}: cannot tell which platform it runs on: {e}. Name it after '@', e.g. {name}@linux/amd64 for a binary, or {name}@any for a script or data"
        ),
    }
}

/// The SHA-256 and size of a file, read in pieces so a large file is never in memory.
async fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<(Digest, u64)> {
        let reading = || format!("reading {}", path.display());
        let f = std::fs::File::open(&path).with_context(reading)?;
        Digest::of_reader(f).with_context(reading)
    })
    .await
    .context("hashing a file")?
}

/// A progress bar on stderr for a large upload, when a person is watching.
fn upload_bar(file: &str, size: u64) -> Result<Option<indicatif::ProgressBar>> {
    use std::io::IsTerminal;
    if size <= PROGRESS_ABOVE || !std::io::stderr().is_terminal() {
        return Ok(None);
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(size),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "[{bar:24}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta}) {wide_msg}",
        )?
        .progress_chars("=> "),
    );
    bar.set_message(file.to_string());
    Ok(Some(bar))
}

async fn push(c: &Client, out: Output, r: &ArtifactRef, args: &[String]) -> Result<i32> {
    let (created, variants) = push_files(c, r, args).await?;
    output::pushed(out, &created, &variants)?;
    Ok(0)
}

/// Uploads the files (`FILE[@PLATFORM]`) that the controller lacks and creates the
/// artifact version; returns it and what was done for each variant.
async fn push_files(
    c: &Client,
    r: &ArtifactRef,
    args: &[String],
) -> Result<(Artifact, Vec<output::Pushed>)> {
    // What each file is for comes first: a mistake there needs no server to report.
    let mut targets = Vec::with_capacity(args.len());
    for arg in args {
        let (path, platform) = split_file_arg(arg)?;
        let meta =
            std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if !meta.is_file() {
            bail!("{}: not a regular file", path.display());
        }
        let platforms = match platform {
            Some(p) => vec![p],
            None => detect_platforms(&path)?,
        };
        // One variant per platform: two files for one platform is a mistake to name
        // here, with both files, before anything is sent.
        for p in &platforms {
            if let Some((other, _)) = targets
                .iter()
                .find(|(_, ps): &&(PathBuf, Vec<BinaryPlatform>)| ps.contains(p))
            {
                bail!(
                    "{} and {} are both for {p}; an artifact has one file per platform (name another platform with FILE@PLATFORM)",
                    other.display(),
                    path.display()
                );
            }
        }
        targets.push((path, platforms));
    }
    // Versions are immutable; finding out now saves hashing and uploading for nothing.
    // (The server checks again when the artifact is created.)
    match c.artifact(r).await {
        Ok(_) => {
            bail!("artifact {r} already exists; versions are immutable, so push a new version")
        }
        Err(e)
            if e.downcast_ref::<client::ApiError>()
                .is_some_and(|a| a.status == 404) => {}
        Err(e) => return Err(e),
    }
    let mut files = Vec::with_capacity(targets.len());
    for (path, platforms) in targets {
        let (digest, size) = hash_file(&path).await?;
        files.push(PushFile {
            path,
            platforms,
            digest,
            size,
        });
    }
    let mut variants: Vec<output::Pushed> = Vec::new();
    for f in &files {
        for p in &f.platforms {
            variants.push(output::Pushed {
                variant: Variant {
                    platform: p.clone(),
                    digest: f.digest.clone(),
                    size: f.size,
                },
                file: f.path.display().to_string(),
                uploaded: false,
            });
        }
    }
    let new = NewArtifact {
        name: r.name.clone(),
        version: r.version.clone(),
        variants: variants.iter().map(|v| v.variant.clone()).collect(),
    };
    new.validate()
        .map_err(|e| anyhow::anyhow!("artifact {r}: {e}"))?;
    let mut sent = std::collections::HashSet::new();
    for f in &files {
        if sent.contains(&f.digest) {
            continue;
        }
        let name = f.path.display().to_string();
        if upload_if_absent(c, &name, &f.path, &f.digest, f.size).await? {
            sent.insert(f.digest.clone());
        }
    }
    for v in &mut variants {
        v.uploaded = sent.contains(&v.variant.digest);
    }
    let created = c.create_artifact(&new).await?;
    Ok((created, variants))
}

/// Uploads a file as the blob `digest` unless the controller has it already, with a
/// progress bar for a big one. Returns whether it was sent.
async fn upload_if_absent(
    c: &Client,
    name: &str,
    path: &Path,
    digest: &Digest,
    size: u64,
) -> Result<bool> {
    let check = c.blob_check(digest).await?;
    if check.exists {
        return Ok(false);
    }
    if let Some(max) = check.max_size.filter(|max| size > *max) {
        bail!(
            "{name} is {}, more than the controller accepts for one file ({})",
            output::size(size),
            output::size(max)
        );
    }
    let bar = upload_bar(name, size)?;
    let progress = bar.clone();
    let result = c
        .upload_blob(digest, path, size, move |n| {
            if let Some(b) = &progress {
                b.inc(n);
            }
        })
        .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result.with_context(|| {
        format!("uploading {name} (if it changed since it was read, try again)")
    })?;
    Ok(true)
}

/// Replaces a local `runtime_env.working_dir` (relative to `base`, the spec file's
/// directory) with the digest of its packed archive, uploading the archive first when
/// `upload` (a plan only needs the digest) unless the controller has it. A value that
/// already is a digest is left as it is. Returns what was packed, e.g. "working_dir
/// ./app (3 files, 1.2 KiB)", when it was a local directory.
pub(crate) async fn resolve_working_dir(
    c: &Client,
    runtime_env: &mut drover_core::spec::RuntimeEnv,
    base: &Path,
    upload: bool,
) -> Result<Option<String>> {
    let Some(w) = runtime_env.working_dir.clone() else {
        return Ok(None);
    };
    if w.parse::<Digest>().is_ok() {
        return Ok(None);
    }
    let dir = base.join(&w);
    let packed = pack::pack_dir(&dir, &pack::PackLimits::default())
        .with_context(|| format!("runtime_env.working_dir {w:?}"))?;
    let digest: Digest = packed
        .digest
        .parse()
        .map_err(|e| anyhow::anyhow!("the archive's digest {}: {e}", packed.digest))?;
    let name = format!(
        "working_dir {} ({} files, {})",
        dir.display(),
        packed.files,
        output::size(packed.bytes)
    );
    if upload {
        upload_if_absent(c, &name, packed.file.path(), &digest, packed.size).await?;
    }
    runtime_env.working_dir = Some(digest.to_string());
    Ok(Some(name))
}

async fn up(a: &UpArgs) -> Result<i32> {
    let data_dir = a.data_dir.clone().unwrap_or_else(config::default_data_dir);
    cluster::ensure_dir(&data_dir)?;
    if a.reset_admin_token {
        // `drover up` keeps its tokens in the data dir and the controller's store one
        // level down, in controller/.
        return reset_admin_token(
            &data_dir.join("controller"),
            &data_dir.join("admin-token"),
            "the next `drover up` serves it and writes it to the CLI config",
        )
        .await;
    }
    let admin = config::secret_in(&data_dir, "admin-token", "drv")?;
    let join = config::secret_in(&data_dir, "join-token", "drj")?;
    let mut server = cluster::start_server(cluster::ServerOptions {
        data_dir: data_dir.join("controller"),
        listen: a.listen,
        admin_token: admin.clone(),
        join_token: join.clone(),
        durability: drover_store::Durability::Full,
        heartbeat_interval: a.timing.heartbeat_interval,
        node_timeout: a.timing.node_timeout,
        node_gone_after: a.timing.node_gone_after,
        retention: a.timing.retention(),
        connections: cluster::ConnectionLimits::default(),
        // `drover up` is a single machine's cluster, on loopback unless told otherwise;
        // its agent and CLI reach it over plain HTTP, as before.
        tls: None,
        nats_url: a.nats.clone(),
    })
    .await?;
    let url = server.url();
    // Each cluster `drover up` starts gets a context of its own, so a second one on
    // another port does not cut the CLI off from the first.
    let name = up_context_name(server.addr);
    let ((), path) = config::update(|cfg| {
        cfg.put(
            &name,
            config::Context {
                server: Some(url.clone()),
                token: Some(admin),
                ..config::Context::default()
            },
        );
        Ok(())
    })?;
    let agent = cluster::start_agent(cluster::AgentOptions {
        server: url.clone(),
        join_token: join,
        data_dir: data_dir.join("agent"),
        name: None,
        labels: BTreeMap::new(),
        capacity: None,
        runtimes: a.runtimes.options(),
        tls: None,
    })
    .await?;
    eprintln!("drover is up at {url} (data in {})", data_dir.display());
    eprintln!(
        "the CLI config in {} points at it as context {name}; try `drover run -- echo hello`",
        path.display()
    );
    let result = tokio::select! {
        r = server.wait() => r,
        _ = shutdown_signal() => Ok(()),
    };
    eprintln!(
        "drover: shutting down; running tasks keep running and are re-adopted by the next `drover up`"
    );
    agent.shutdown().await;
    server.stop().await;
    result.map(|_| 0)
}

async fn server(a: &ServerArgs) -> Result<i32> {
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| config::default_data_dir().join("controller"));
    cluster::ensure_dir(&data_dir)?;
    if a.reset_admin_token {
        return reset_admin_token(
            &data_dir,
            &data_dir.join("admin-token"),
            "start the server, or restart it if it is running, to use it",
        )
        .await;
    }
    let admin = config::secret_in(&data_dir, "admin-token", "drv")?;
    let join = match &a.join_token {
        Some(j) => j.clone(),
        None => config::secret_in(&data_dir, "join-token", "drj")?,
    };
    let tls = server_tls(a, &data_dir)?;
    let mut server = cluster::start_server(cluster::ServerOptions {
        data_dir: data_dir.clone(),
        listen: a.listen,
        admin_token: admin,
        join_token: join,
        durability: drover_store::Durability::Full,
        heartbeat_interval: a.timing.heartbeat_interval,
        node_timeout: a.timing.node_timeout,
        node_gone_after: a.timing.node_gone_after,
        retention: a.timing.retention(),
        connections: a.connections.limits(),
        tls: tls.as_ref().map(|t| t.identity.clone()),
        nats_url: a.nats.clone(),
    })
    .await?;
    eprintln!("drover server listening on {}", server.url());
    // How agents and clients are to trust it, appended to the commands printed below.
    let trust = match &tls {
        Some(t) => {
            eprintln!(
                "TLS certificate: {} ({}), fingerprint {}",
                t.cert.display(),
                t.origin,
                t.identity.fingerprint
            );
            eprintln!(
                "clients trust it with --server-fingerprint {} (or DROVER_SERVER_FINGERPRINT), or --ca with a copy of {} (or DROVER_CA)",
                t.identity.fingerprint,
                t.cert.display()
            );
            format!(" --server-fingerprint {}", t.identity.fingerprint)
        }
        None => {
            eprintln!(
                "serving plain HTTP (--insecure-http): tokens and job data cross the network unencrypted"
            );
            String::new()
        }
    };
    let admin_file = data_dir.join("admin-token");
    eprintln!(
        "cluster admin token: {} (use it with DROVER_TOKEN=\"$(cat {})\")",
        admin_file.display(),
        admin_file.display()
    );
    // A server listening on every address has no one URL agents should dial.
    let dial = if server.addr.ip().is_unspecified() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        format!("{scheme}://CONTROLLER-HOST:{}", server.addr.port())
    } else {
        server.url()
    };
    let join_file = match &a.join_token {
        Some(_) => "FILE-HOLDING-THE-JOIN-TOKEN".to_string(),
        None => data_dir.join("join-token").display().to_string(),
    };
    match &a.join_token {
        Some(_) => eprintln!(
            "join token: the one given with --join-token or {JOIN_TOKEN_ENV}; agents join with:"
        ),
        None => {
            eprintln!("join token: {join_file}; agents join with (copy the file to their hosts):")
        }
    }
    eprintln!("  drover agent --server {dial}{trust} --join-token-file {join_file}");
    eprintln!(
        "  or {JOIN_TOKEN_ENV}=\"$(cat {join_file})\" drover agent --server {dial}{trust}  (not --join-token: `ps` shows it to every user)"
    );
    let result = tokio::select! {
        r = server.wait() => r,
        _ = shutdown_signal() => Ok(()),
    };
    server.stop().await;
    result.map(|_| 0)
}

/// The certificate `drover server` serves, where it is, and where it came from.
struct ServerTls {
    identity: drover_tls::ServerIdentity,
    cert: PathBuf,
    origin: &'static str,
}

/// The server's TLS: the files of --tls-cert and --tls-key, else a self-signed
/// certificate generated once into DATA_DIR/tls/ (its key readable by its owner only);
/// none with --insecure-http.
fn server_tls(a: &ServerArgs, data_dir: &Path) -> Result<Option<ServerTls>> {
    if a.insecure_http {
        return Ok(None);
    }
    let given = |e: drover_tls::TlsError| -> anyhow::Error {
        match e {
            drover_tls::TlsError::Config(_) => anyhow::Error::new(e),
            _ => UsageError(e.to_string()).into(),
        }
    };
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        let identity = drover_tls::ServerIdentity::load(cert, key, "--tls-cert", "--tls-key")
            .map_err(given)?;
        return Ok(Some(ServerTls {
            identity,
            cert: cert.clone(),
            origin: "given with --tls-cert",
        }));
    }
    let dir = data_dir.join("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = drover_tls::ensure_self_signed(&cert, &key, &certificate_names(a.listen))
        .with_context(|| format!("the server's certificate in {}", dir.display()))?;
    let identity = drover_tls::ServerIdentity::load(&cert, &key, "certificate", "key")
        .with_context(|| {
            format!(
                "the server's certificate in {}; remove both files to have new ones generated",
                dir.display()
            )
        })?;
    Ok(Some(ServerTls {
        identity,
        cert,
        origin: if made {
            "generated now, self-signed"
        } else {
            "self-signed, generated earlier"
        },
    }))
}

/// The names a generated certificate is valid for: this host's loopback names, its host
/// name and the address it listens on. Agents on other hosts usually pin its
/// fingerprint instead, which does not depend on the name they dial.
fn certificate_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let host = drover_agent::hostname();
    if host.is_ascii() && !names.contains(&host) {
        names.push(host);
    }
    let ip = listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    names
}

/// `--reset-admin-token` of `drover server` and `drover up`: a new cluster admin token
/// in the store under `controller_dir`, its secret in `token_file`, and no server.
async fn reset_admin_token(controller_dir: &Path, token_file: &Path, then: &str) -> Result<i32> {
    let record = cluster::reset_admin_token(controller_dir, token_file).await?;
    eprintln!(
        "new cluster admin token {} stored; its secret is in {} ({then})",
        record.id(),
        token_file.display()
    );
    eprintln!(
        "use it with DROVER_TOKEN=\"$(cat {})\", and revoke any token you no longer trust with `drover token revoke ID`",
        token_file.display()
    );
    Ok(0)
}

async fn agent(cli: &Cli, a: &AgentArgs) -> Result<i32> {
    let server = cli
        .server
        .as_deref()
        .context("drover agent needs --server URL (or DROVER_SERVER): the controller to dial")?;
    // The agent reads only its flags and environment, never the CLI's config file.
    let tls = if server.starts_with("https://") {
        let pin = cli
            .server_fingerprint
            .clone()
            .map(|p| (p, "--server-fingerprint".to_string()));
        Some(client_tls(cli.ca.as_deref(), pin)?)
    } else {
        None
    };
    let join_token = a.join_token()?;
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| config::default_data_dir().join("agent"));
    let capacity = match (a.cpu, parse_memory(&a.memory, "memory")?) {
        (None, None) => None,
        (cpu, mem) => {
            let d = drover_agent::detect_capacity();
            Some(Resources {
                cpu: cpu.unwrap_or(d.cpu),
                memory: mem.unwrap_or(d.memory),
            })
        }
    };
    let agent = cluster::start_agent(cluster::AgentOptions {
        server: server.to_string(),
        join_token,
        data_dir,
        name: a.name.clone(),
        labels: a.labels.iter().cloned().collect(),
        capacity,
        runtimes: a.runtimes.options(),
        tls,
    })
    .await?;
    eprintln!("drover agent {} dialling {server}", agent.node_id());
    let mut agent = agent;
    tokio::select! {
        () = shutdown_signal() => {}
        stopped = agent.stopped() => {
            // Only a refused join token stops an agent on its own; the tasks it may have
            // adopted keep running for the next agent process, as after a crash.
            if let Err(why) = stopped {
                bail!("{why}");
            }
        }
    }
    agent.shutdown().await;
    Ok(0)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command, flag and argument says what it is for in `--help`.
    #[test]
    fn every_command_flag_and_argument_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let here = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && cmd.get_long_about().is_none() && !cmd.is_hide_set() {
                missing.push(format!("{here}: the command"));
            }
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin
                    && !a.is_hide_set()
                    && a.get_help().is_none()
                    && a.get_long_help().is_none()
                {
                    missing.push(format!("{here}: {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &here, missing);
                }
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(
            missing.is_empty(),
            "without a description:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn each_line_of_a_chunked_stream_gets_one_prefix() {
        let mut start = true;
        let mut out = String::new();
        for chunk in ["a\nb", "c\n", "", "d\n\ne"] {
            out.push_str(&prefix_lines(chunk, "[1] ", &mut start));
        }
        assert_eq!(out, "[1] a\n[1] bc\n[1] d\n[1] \n[1] e");
        assert!(!start);
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
        globals::command::<Cli>().debug_assert();
    }

    /// The help of the command at `path`, as `drover PATH --help` prints it.
    fn long_help(path: &[&str]) -> String {
        let mut cmd = globals::command::<Cli>();
        // Building copies the globals onto the subcommands, as parsing does.
        cmd.build();
        let mut here = &mut cmd;
        for name in path {
            here = here
                .find_subcommand_mut(name)
                .unwrap_or_else(|| panic!("no command {name} in {path:?}"));
        }
        here.render_long_help().to_string()
    }

    fn args(line: &str) -> Vec<String> {
        std::iter::once("drover")
            .chain(line.split_whitespace())
            .map(String::from)
            .collect()
    }

    #[test]
    fn help_offers_only_the_global_flags_a_command_reads() {
        // (command, flags its help must show, flags it must not)
        let cases: &[(&[&str], &[&str], &[&str])] = &[
            (
                &["up"],
                &["--listen"],
                &["--token", "--server", "--output", "--context"],
            ),
            (
                &["server"],
                &["--listen"],
                &["--token", "--server", "--project"],
            ),
            (&["completions"], &[], &["--token", "--output"]),
            (
                &["agent"],
                &["--server", "--ca", "--server-fingerprint"],
                &["--token", "--project", "--output"],
            ),
            (
                &["run"],
                &["--server", "--token", "--project"],
                &["--output"],
            ),
            (
                &["job", "ls"],
                &["--server", "--token", "--project", "--output", "--context"],
                &[],
            ),
            (&["context", "use"], &[], &["--server", "--output"]),
            (&["context", "ls"], &["--output"], &["--server", "--token"]),
            (&["version"], &["--server", "--output"], &["--project"]),
        ];
        for (path, shown, hidden) in cases {
            let help = long_help(path);
            // An option's own line, `--server <SERVER>`, not an example that uses it.
            let offers = |flag: &str| help.contains(&format!("{} <", flag.trim()));
            for flag in *shown {
                assert!(offers(flag), "drover {path:?} --help lacks {flag}:\n{help}");
            }
            for flag in *hidden {
                assert!(
                    !offers(flag),
                    "drover {path:?} --help offers {flag}:\n{help}"
                );
            }
        }
    }

    #[test]
    fn a_global_flag_a_command_does_not_read_is_refused() {
        for (line, refused) in [
            ("up --token abc", Some("--token")),
            ("completions bash --server http://x", Some("--server")),
            ("context use local -o json", Some("-o")),
            ("run -o json -- echo", Some("-o")),
            ("agent --project a --server http://x", Some("--project")),
            ("job ls --token abc -o json", None),
            ("agent --server http://x --ca ca.pem", None),
        ] {
            match (parse(&args(line)), refused) {
                (Ok(_), None) => {}
                (Err(e), Some(flag)) => {
                    assert_eq!(
                        e.kind(),
                        clap::error::ErrorKind::ArgumentConflict,
                        "{line}: {e}"
                    );
                    assert_eq!(e.exit_code(), code::USAGE, "{line}");
                    assert!(e.to_string().contains(flag), "{line}: {e}");
                }
                (Ok(_), Some(flag)) => panic!("{line}: {flag} was accepted"),
                (Err(e), None) => panic!("{line}: refused: {e}"),
            }
        }
    }

    #[test]
    fn examples_and_explanations_fit_80_columns() {
        fn walk(cmd: &clap::Command, path: &str, long: &mut Vec<String>) {
            let here = format!("{path} {}", cmd.get_name());
            // Notes and examples after the options are laid out by hand, and an example
            // that clap wrapped could not be pasted; a description (from a doc comment)
            // is one paragraph per line that clap wraps, but the examples indented in it
            // must fit too.
            let after = [cmd.get_after_help(), cmd.get_after_long_help()];
            for text in after.into_iter().flatten() {
                long.extend(
                    text.to_string()
                        .lines()
                        .filter(|l| l.chars().count() > 80)
                        .map(|l| format!("{here}: {l}")),
                );
            }
            if let Some(text) = cmd.get_long_about() {
                long.extend(
                    text.to_string()
                        .lines()
                        .filter(|l| l.starts_with(' ') && l.chars().count() > 80)
                        .map(|l| format!("{here}: {l}")),
                );
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &here, long);
            }
        }
        let mut long = Vec::new();
        walk(&Cli::command(), "", &mut long);
        assert!(
            long.is_empty(),
            "lines wider than 80 columns:\n{}",
            long.join("\n")
        );
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(
            exit_code(Some(&Exit {
                code: Some(3),
                signal: None
            })),
            3
        );
        assert_eq!(
            exit_code(Some(&Exit {
                code: None,
                signal: Some("SIGKILL".into())
            })),
            137
        );
        assert_eq!(exit_code(None), code::ERROR);
    }
}
